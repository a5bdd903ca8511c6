"""Offline preparation of raw dataset dumps into TFDS timeline records.

Modules:
  records    raw event / item types and bad-input bookkeeping shared by readers.
  readers    the reader interface, the bad-line tracker and the reader registry.
  movielens  MovieLens readers (csv, `::` dat and ml-100k layouts).
  synthetic  deterministic synthetic data in the MovieLens csv format.
  timelines  grouping, ordering, de-duplication, vocabularies, protocols.
  builder    the TFDS builder (array_record, no TensorFlow).
  prepare    CLI and `prepare_dataset(...)` Python API.

Importing this package is cheap; TFDS is imported only by `builder`/`prepare`.
"""
