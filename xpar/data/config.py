"""DataConfig: corpus, tokenizer and block length of the data pipeline; validates itself."""

from __future__ import annotations

from dataclasses import dataclass, field

from xpar.config.checks import bad, is_int, is_number, need_bool, need_int, need_str


@dataclass
class DataConfig:
    """The data node of the config tree.

    files=[] trains on the default corpus: the running interpreter's standard library .py
    files (no download). tokenizer="byte" is the built-in byte tokenizer (vocab 257: bytes
    0..255 plus an end-of-document id 256); any other value is a local directory holding a
    Hugging Face tokenizer.json. cache_dir="" caches under ~/.cache/xpar/data.
    """

    files: list[str] = field(default_factory=list)
    text_field: str = "text"  # the json/parquet column holding text
    tokenizer: str = "byte"
    seq_len: int = 128  # tokens per training sequence
    val_fraction: float = 0.05  # validation share of the tokens (within +-50%)
    max_files: int = 100  # cap on corpus files, a stable subset (0: all)
    seed: int = 1234  # data order seed
    shuffle: bool = True  # shuffle the training blocks every epoch
    cache_dir: str = ""
    # A corpus file that is not text (a NUL byte, or over 1% of its bytes not UTF-8; see
    # xpar/data/textcheck.py) is a config error naming it; true skips such files instead,
    # with one warning line that names them.
    skip_bad_files: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, prefix: str = "data") -> None:
        # OmegaConf hands us a ListConfig; anything list-like of strings is fine.
        if isinstance(self.files, (str, bytes)) or not hasattr(self.files, "__iter__"):
            raise bad(
                prefix, "files", self.files, "give a list of paths or globs, e.g. [data/*.jsonl]"
            )
        for f in self.files:
            if not isinstance(f, str) or not f.strip():
                raise bad(
                    prefix,
                    "files",
                    list(self.files),
                    "every entry must be a non-empty path or glob",
                )
        need_str(prefix, self, "text_field", "name the json/parquet column holding text")
        need_str(prefix, self, "tokenizer", 'use "byte" or a local tokenizer directory')
        need_int(prefix, self, "seq_len", 1, "use an integer >= 1 (tokens per training sequence)")
        vf = self.val_fraction
        if not is_number(vf) or not 0.0 < vf < 1.0:
            raise bad(
                prefix, "val_fraction", vf, "use a number strictly between 0 and 1, e.g. 0.05"
            )
        need_int(prefix, self, "max_files", 0, "use 0 (all files) or a file count >= 1")
        if not is_int(self.seed):
            raise bad(prefix, "seed", self.seed, "use an integer")
        need_bool(prefix, self, "shuffle")
        need_bool(prefix, self, "skip_bad_files")
        if not isinstance(self.cache_dir, str):
            raise bad(
                prefix, "cache_dir", self.cache_dir, 'use a directory path, or "" for the default'
            )
