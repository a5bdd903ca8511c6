"""Offline preparation of raw dataset dumps into TFDS timeline records.

Modules:
  records    raw event / item types and bad-input bookkeeping shared by readers.
  readers    the reader interface, the bad-line tracker and the reader registry.
  movielens  MovieLens readers (csv, `::` dat and ml-100k layouts).
  amazon     Amazon Review readers (2018 and 2014 dumps, metadata, de-duplication).
  google_local  Google Local Review readers (per-state review and metadata dumps).
  jsonl      JSON-lines / gzip streaming and the review-dump reader shared by both.
  beam_grouping  Apache Beam variant of the builder (`--beam`).
  synthetic  deterministic synthetic data in the MovieLens csv format.
  timelines  grouping, ordering, de-duplication, vocabularies, protocols.
  builder    the TFDS builder (array_record, no TensorFlow).
  prepare    CLI and `prepare_dataset(...)` Python API.

Importing this package is cheap; TFDS is imported only by `builder`/`prepare`.
"""
