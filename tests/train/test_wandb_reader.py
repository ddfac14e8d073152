"""The offline-run reader on hand-built files: records spanning blocks, corruption, truncation."""

from __future__ import annotations

import struct
import zlib

import pytest

from xpar.train.wandb_reader import has_exit_record, read_offline_run


def _frame(records: list[bytes]) -> bytes:
    """Write payloads as a leveldb log (our own writer, to test the reader's framing)."""
    out = bytearray(b":W&B" + struct.pack("<HB", 0xBEE1, 0))
    for rec in records:
        first = True
        while True:
            left = 32768 - len(out) % 32768
            if left < 7:
                out += b"\0" * left
                continue
            take = min(left - 7, len(rec))
            last = take == len(rec)
            kind = (1 if last else 2) if first else (4 if last else 3)
            chunk, rec = rec[:take], rec[take:]
            crc = zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF
            out += struct.pack("<IHB", crc, len(chunk), kind) + chunk
            first = False
            if last:
                break
    return bytes(out)


def _records() -> list[bytes]:
    from wandb.proto import wandb_internal_pb2 as pb

    run = pb.Record()
    run.run.run_id = "handmade"
    item = run.run.config.update.add()
    item.key, item.value_json = "big", '"' + "x" * 70000 + '"'  # spans 3 blocks
    recs = [run.SerializeToString()]
    for step in range(3):
        h = pb.Record()
        i = h.history.item.add()
        i.nested_key.append("_step")
        i.value_json = str(step)
        i = h.history.item.add()
        i.nested_key.append("train/loss")
        i.number = 1.0 / (step + 1)  # typed value, not value_json
        recs.append(h.SerializeToString())
    return recs


def test_reader_handles_block_spanning_records_and_truncation(tmp_path):
    data = _frame(_records())
    path = tmp_path / "run-handmade.wandb"
    path.write_bytes(data)
    run = read_offline_run(path)
    assert run["run_id"] == "handmade"
    assert len(run["config"]["big"]) == 70000
    assert [r["train/loss"] for r in run["history"]] == [1.0, 0.5, 1.0 / 3]

    path.write_bytes(data[:-3])  # a crash mid-write: the last record is lost, no error
    assert len(read_offline_run(path)["history"]) == 2

    bad = bytearray(data)
    bad[-1] ^= 0xFF
    path.write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="checksum"):
        read_offline_run(path)
    path.write_bytes(_frame(_records()[1:]))  # history but no run record yet
    with pytest.raises(ValueError, match="no run record"):
        read_offline_run(path)
    path.write_bytes(b"not a wandb file")
    with pytest.raises(ValueError, match="header"):
        read_offline_run(path)
    with pytest.raises(FileNotFoundError):
        read_offline_run(tmp_path / "empty_dir_that_is_missing")


def test_exit_record_marks_a_complete_file(tmp_path):
    from wandb.proto import wandb_internal_pb2 as pb

    path = tmp_path / "run-handmade.wandb"
    path.write_bytes(_frame(_records()))
    assert not has_exit_record(path)  # still running (or killed)
    done = pb.Record()
    done.exit.exit_code = 0
    path.write_bytes(_frame([*_records(), done.SerializeToString()]))
    assert has_exit_record(path)
    assert len(read_offline_run(path)["history"]) == 3  # the exit record adds no row
