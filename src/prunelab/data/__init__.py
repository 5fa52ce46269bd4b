"""Data: text corpora and GLUE readers, calibration sampling, synthesized speech."""
