'use strict';
// Find image files under the paths given by the caller, in a stable order, and read them.

const fs = require('node:fs/promises');
const path = require('node:path');

// Folders are searched for these suffixes. A file named explicitly is always taken, whatever its
// name, because the services read the format from the bytes.
const IMAGE_SUFFIXES = new Set([
  '.jpg', '.jpeg', '.png', '.webp', '.bmp', '.gif', '.tif', '.tiff', '.avif', '.heic', '.heif',
]);

/** A local file or folder is missing or cannot be read. `path` names it. */
class FileError extends Error {
  constructor(message, filePath, cause) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = 'FileError';
    this.path = filePath;
  }
}

/**
 * Lists the files named in `paths` and the image files inside the folders named in `paths`.
 *
 * Folders are searched recursively, without following links to folders, and their files are
 * sorted by path. Throws FileError for a path that does not exist or cannot be listed.
 */
async function findImages(paths) {
  const files = [];
  for (const inputPath of paths) {
    const stats = await statOrThrow(inputPath);
    if (stats.isDirectory()) {
      const found = await listImages(inputPath);
      files.push(...found.sort());
    } else {
      files.push(inputPath);
    }
  }
  return files;
}

/** Reads one file into a Buffer. Throws FileError naming the file when it cannot. */
async function readFile(filePath) {
  try {
    return await fs.readFile(filePath);
  } catch (error) {
    const problem =
      error.code === 'ENOENT' ? `no such file: ${filePath}` : `cannot read ${filePath}: ${error.code ?? error.message}`;
    throw new FileError(problem, filePath, error);
  }
}

async function statOrThrow(inputPath) {
  try {
    return await fs.stat(inputPath);
  } catch (error) {
    if (error.code === 'ENOENT' || error.code === 'ENOTDIR') {
      throw new FileError(`no such file or folder: ${inputPath}`, inputPath, error);
    }
    throw new FileError(`cannot read ${inputPath}: ${error.code ?? error.message}`, inputPath, error);
  }
}

async function listImages(folder) {
  let entries;
  try {
    entries = await fs.readdir(folder, { withFileTypes: true });
  } catch (error) {
    throw new FileError(`cannot list the folder ${folder}: ${error.code ?? error.message}`, folder, error);
  }
  const files = [];
  for (const entry of entries) {
    const entryPath = path.join(folder, entry.name);
    if (entry.isDirectory()) {
      files.push(...(await listImages(entryPath)));
    } else if (IMAGE_SUFFIXES.has(path.extname(entry.name).toLowerCase()) && (await isFile(entry, entryPath))) {
      files.push(entryPath);
    }
  }
  return files;
}

async function isFile(entry, entryPath) {
  if (!entry.isSymbolicLink()) {
    return entry.isFile();
  }
  // A link is taken when it points to a file; a dangling link is left out.
  try {
    return (await fs.stat(entryPath)).isFile();
  } catch {
    return false;
  }
}

module.exports = { FileError, IMAGE_SUFFIXES, findImages, readFile };
