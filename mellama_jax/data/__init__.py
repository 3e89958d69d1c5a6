"""Data: text in, packed token rows out.

`tokenizer` (SentencePiece / tokenizer.json), `sources` (JSONL, text, Parquet, array_record, TFDS), `prepare`
(corpora -> array_record shards + manifest), `cpt` (the weighted mixture), `sft` (instruction records with the loss
on answers), `packing` (rows with segment ids, held-out shares), `synthetic` (the counting corpus), `cli`
(`mellama prepare`). Imports only the shared ground.
"""
