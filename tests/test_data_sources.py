"""Corpus files: every format reads, and every kind of bad input is named by file and line/record."""

import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python.array_record_module import ArrayRecordWriter

from mellama_jax.data.sources import open_documents
from mellama_jax.errors import UserError

NOTES = ["Patient is a 64-year-old man with type 2 diabetes.", "Metformin 500 mg twice daily.", "No known allergies."]


def write_jsonl(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def write_array_record(path, records):
    writer = ArrayRecordWriter(str(path), "group_size:1")
    for record in records:
        writer.write(record)
    writer.close()
    return path


def read_all(docs):
    return [docs.get(i) for i in range(len(docs))]


def test_every_format_reads_the_same_documents(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [json.dumps({"text": NOTES[0], "id": 1}), "", json.dumps({"text": NOTES[1]})])
    write_jsonl(tmp_path / "b.jsonl", [json.dumps({"text": NOTES[2]})])
    (tmp_path / "txt").mkdir()
    for i, note in enumerate(NOTES):
        (tmp_path / "txt" / f"{i}.txt").write_text(note)
    pq.write_table(pa.table({"body": NOTES[:2]}), tmp_path / "a.parquet", row_group_size=1)
    pq.write_table(pa.table({"body": NOTES[2:]}), tmp_path / "b.parquet")
    write_array_record(tmp_path / "a.array_record", [json.dumps({"text": n}).encode() for n in NOTES])
    sources = {
        "jsonl": open_documents("j", [str(tmp_path / "*.jsonl")], "", "text", "raise"),
        "text": open_documents("t", [str(tmp_path / "txt")], "", "text", "raise"),
        "parquet": open_documents("p", [str(tmp_path / "*.parquet")], "", "body", "raise"),
        "array_record": open_documents("a", [str(tmp_path / "a.array_record")], "", "text", "raise"),
    }
    for fmt, docs in sources.items():
        assert read_all(docs) == NOTES, fmt


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "ok"', r"bad\.jsonl:3: invalid JSON \(Expecting ',' delimiter, column 14\)"),
        ('{"body": "x"}', r"bad\.jsonl:3: no 'text' field"),
        ('{"text": 7}', r"bad\.jsonl:3: field 'text' is int, not a string"),
        ("[1, 2]", r"bad\.jsonl:3: expected a JSON object, got list"),
    ],
)
def test_a_malformed_jsonl_line_is_named_by_file_and_line(tmp_path, line, message):
    lines = [json.dumps({"text": NOTES[0]}), "", line, json.dumps({"text": NOTES[1]})]
    docs = open_documents("notes", [str(write_jsonl(tmp_path / "bad.jsonl", lines))], "", "text", "raise")
    with pytest.raises(UserError, match=message + r" \(set data.on_error: skip"):
        read_all(docs)


def test_skip_counts_bad_records_and_never_logs_their_text(tmp_path, caplog):
    secret = "SSN 123-45-6789"
    lines = [
        json.dumps({"text": NOTES[0]}),
        '{"text": "' + secret,
        json.dumps({"note": secret}),
        json.dumps({"text": NOTES[1]}),
    ]
    docs = open_documents("notes", [str(write_jsonl(tmp_path / "c.jsonl", lines))], "", "text", "skip")
    with caplog.at_level(logging.WARNING):
        assert read_all(docs) == [NOTES[0], None, None, NOTES[1]]
    assert docs.skipped == 2 and "c.jsonl:2: invalid JSON" in caplog.text and "c.jsonl:3: no 'text'" in caplog.text
    assert "skipped malformed record 2," in caplog.text and "123-45" not in caplog.text
    many = open_documents("notes", [str(write_jsonl(tmp_path / "d.jsonl", ["{"] * 12))], "", "text", "skip")
    with caplog.at_level(logging.WARNING):
        read_all(many)
    assert "source notes: 10 malformed records skipped so far" in caplog.text and "record 6," not in caplog.text


def test_bad_text_parquet_and_array_record_inputs_are_named(tmp_path):
    (tmp_path / "note.txt").write_bytes(b"line one\nline two \xff\n")
    with pytest.raises(UserError, match=r"note\.txt:2: not UTF-8 \(byte 18\)"):
        read_all(open_documents("t", [str(tmp_path / "note.txt")], "", "text", "raise"))
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "n.parquet")
    with pytest.raises(UserError, match=r"n\.parquet:row 2: column 'text' is NoneType"):
        read_all(open_documents("p", [str(tmp_path / "n.parquet")], "", "text", "raise"))
    with pytest.raises(UserError, match=r"n\.parquet: no column 'body' \(columns: text\)"):
        open_documents("p", [str(tmp_path / "n.parquet")], "", "body", "raise")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(UserError, match=r"fake\.parquet: not a Parquet file"):
        open_documents("p", [str(tmp_path / "fake.parquet")], "", "text", "raise")
    write_array_record(tmp_path / "r.array_record", [json.dumps({"text": "a"}).encode(), b"\x00garbage"])
    with pytest.raises(UserError, match=r"r\.array_record:record 2: invalid JSON"):
        read_all(open_documents("a", [str(tmp_path / "r.array_record")], "", "text", "raise"))


def test_empty_missing_and_unknown_sources_are_errors(tmp_path):
    write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(UserError, match=r"source empty: no documents in .*empty\.jsonl"):
        open_documents("empty", [str(tmp_path / "empty.jsonl")], "", "text", "raise")
    with pytest.raises(UserError, match=r"nowhere/\*\.jsonl: no such file, folder or matching files"):
        open_documents("gone", [str(tmp_path / "nowhere" / "*.jsonl")], "", "text", "raise")
    (tmp_path / "notes.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"source csv: set its format; the file extensions do not say one"):
        open_documents("csv", [str(tmp_path / "notes.csv")], "", "text", "raise")
    (tmp_path / "dir").mkdir()
    with pytest.raises(UserError, match=r"source d: .*dir holds no files"):
        open_documents("d", [str(tmp_path / "dir")], "", "text", "raise")


def build_tfds_notes(data_dir, notes):
    """A TFDS dataset prepared here in array_record format (TFDS builds and reads it without TensorFlow)."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class ClinicalNotes(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"note": tfds.features.Text()})
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            yield from ((i, {"note": note}) for i, note in enumerate(notes))

    ClinicalNotes(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_tfds_datasets_read_through_data_source(tmp_path):
    build_tfds_notes(tmp_path, NOTES)
    docs = open_documents("tfds", ["clinical_notes"], "tfds", "note", "raise", "train", str(tmp_path))
    assert sorted(read_all(docs)) == sorted(NOTES)
    assert docs.where(1) == "tfds:clinical_notes[train]:record 2"
    with pytest.raises(UserError, match=r"tfds:clinical_notes\[train\]:record 1: no 'text' field"):
        open_documents("tfds", ["clinical_notes"], "tfds", "text", "raise", "train", str(tmp_path)).get(0)
    with pytest.raises(UserError, match=r"source gone: tfds no_such_notes\[train\]: "):
        open_documents("gone", ["no_such_notes"], "tfds", "note", "raise", "train", str(tmp_path))
