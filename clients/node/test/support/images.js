'use strict';
// Test images: COCO128 photos when the shared dataset is present, otherwise seeded noise BMPs.

const fs = require('node:fs');
const path = require('node:path');

const { REPO_ROOT } = require('./services');

// IMGSEARCH_COCO128_DIR overrides the folder. An empty value selects the noise images.
const COCO128_DIR =
  process.env.IMGSEARCH_COCO128_DIR ??
  path.resolve(REPO_ROOT, '..', 'shared', 'datasets', 'coco128', 'images', 'train2017');

/**
 * Writes `count` distinct images into `folder` and returns their paths, sorted.
 *
 * `first` picks which ones: the COCO128 photos from that position on, or the noise images of the
 * seeds from `first` on. Different `first` ranges give different images.
 */
function writeImages(folder, first, count) {
  fs.mkdirSync(folder, { recursive: true });
  const photos = listPhotos();
  const usePhotos = photos.length >= first + count;
  const paths = [];
  for (let number = first; number < first + count; number += 1) {
    if (usePhotos) {
      const target = path.join(folder, photos[number]);
      fs.copyFileSync(path.join(COCO128_DIR, photos[number]), target);
      paths.push(target);
    } else {
      const target = path.join(folder, `noise-${String(number).padStart(4, '0')}.bmp`);
      fs.writeFileSync(target, noiseBmp(48 + (number % 5) * 8, 40 + (number % 3) * 8, number));
      paths.push(target);
    }
  }
  return paths.sort();
}

function listPhotos() {
  if (!COCO128_DIR || !fs.existsSync(COCO128_DIR)) {
    return [];
  }
  return fs.readdirSync(COCO128_DIR).filter((name) => name.endsWith('.jpg')).sort();
}

/** Returns a 24-bit BMP of seeded uniform RGB noise. */
function noiseBmp(width, height, seed) {
  const rowBytes = Math.ceil((width * 3) / 4) * 4;
  const pixelBytes = rowBytes * height;
  const file = Buffer.alloc(54 + pixelBytes);
  file.write('BM', 0, 'ascii');
  file.writeUInt32LE(file.length, 2);
  file.writeUInt32LE(54, 10); // offset of the pixels
  file.writeUInt32LE(40, 14); // size of the BITMAPINFOHEADER
  file.writeInt32LE(width, 18);
  file.writeInt32LE(height, 22);
  file.writeUInt16LE(1, 26); // colour planes
  file.writeUInt16LE(24, 28); // bits per pixel
  file.writeUInt32LE(pixelBytes, 34);
  const random = mulberry32(seed);
  for (let row = 0; row < height; row += 1) {
    for (let byte = 0; byte < width * 3; byte += 1) {
      file[54 + row * rowBytes + byte] = Math.floor(random() * 256);
    }
  }
  return file;
}

/** Returns a seeded generator of uniform numbers in [0, 1) (the mulberry32 generator). */
function mulberry32(seed) {
  let state = seed >>> 0;
  return () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let value = state;
    value = Math.imul(value ^ (value >>> 15), value | 1);
    value ^= value + Math.imul(value ^ (value >>> 7), value | 61);
    return ((value ^ (value >>> 14)) >>> 0) / 2 ** 32;
  };
}

module.exports = { COCO128_DIR, noiseBmp, writeImages };
