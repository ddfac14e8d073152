"""DataConfig: corpus, tokenizer and block length of the data pipeline; validates itself."""

from __future__ import annotations

from dataclasses import dataclass, field

from xpar.errors import XparConfigError


@dataclass
class DataConfig:
    """The data node of the config tree.

    files=[] trains on the default corpus: the running interpreter's standard library .py
    files (no download). tokenizer="byte" is the built-in byte tokenizer (vocab 257: bytes
    0..255 plus an end-of-document id 256); any other value is a local directory holding a
    Hugging Face tokenizer.json. cache_dir="" caches under ~/.cache/xpar/data.
    """

    files: list[str] = field(default_factory=list)
    text_field: str = "text"
    tokenizer: str = "byte"
    seq_len: int = 256
    val_fraction: float = 0.05
    max_files: int = 0
    seed: int = 1234
    shuffle: bool = True
    cache_dir: str = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "data") -> None:
        def bad(name: str, value: object, fix: str) -> XparConfigError:
            return XparConfigError(f"{prefix}.{name}={value!r} is invalid: {fix}")

        # OmegaConf hands us a ListConfig; anything list-like of strings is fine.
        if isinstance(self.files, (str, bytes)) or not hasattr(self.files, "__iter__"):
            raise bad("files", self.files, "give a list of paths or globs, e.g. [data/*.jsonl]")
        for f in self.files:
            if not isinstance(f, str) or not f.strip():
                raise bad("files", list(self.files), "every entry must be a non-empty path or glob")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise bad("text_field", self.text_field, "name the json/parquet column holding text")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise bad("tokenizer", self.tokenizer, 'use "byte" or a local tokenizer directory')
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise bad("seq_len", self.seq_len, "use an integer >= 1 (tokens per training sequence)")
        vf = self.val_fraction
        if isinstance(vf, bool) or not isinstance(vf, (int, float)) or not 0.0 < vf < 1.0:
            raise bad("val_fraction", vf, "use a number strictly between 0 and 1, e.g. 0.05")
        mf = self.max_files
        if isinstance(mf, bool) or not isinstance(mf, int) or mf < 0:
            raise bad("max_files", mf, "use 0 (all files) or a file count >= 1")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise bad("seed", self.seed, "use an integer")
        if not isinstance(self.shuffle, bool):
            raise bad("shuffle", self.shuffle, "use true or false")
        if not isinstance(self.cache_dir, str):
            raise bad("cache_dir", self.cache_dir, 'use a directory path, or "" for the default')
