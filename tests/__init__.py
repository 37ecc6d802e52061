"""Tests of imgsearch. The folder is a package so that shared fakes import as tests.fakes."""
