"""Build the grokviz training corpus (and its SentencePiece tokenizer) from sources available offline.

Three recognisable domains, recorded per document in the ``domain`` field:

* ``code``    — source files of the Python standard library of the running interpreter (PSF licence);
* ``prose``   — English prose from the same install: the Python language/library reference topics shipped as
  ``pydoc_data/topics.py``, the longer docstrings of the standard library, and the Python licence text (PSF);
* ``numbers`` — synthetic arithmetic, number sequences and tables generated here from a fixed seed (CC0).

Output: ``corpus.jsonl.xz`` — one JSON object per line, ``{"id", "domain", "source", "split", "text"}``;
``split`` is ``"train"`` or ``"validation"``, decided by a hash of the *source file* so that a file's code and
its docstrings always land in the same split. The committed corpus is the canonical artefact (its SHA-256 is in
PROVENANCE.md and checked by the tests); re-running this script on another Python 3.11 patch release gives a
slightly different corpus, which is why the checksum of the shipped file is recorded rather than re-derived.

Usage (from the source tree; the installed package carries the corpus and its reader, not this script)::

    python scripts/build_corpus.py                 # writes grokviz/corpus/corpus.jsonl.xz
    python scripts/build_corpus.py --tokenizer     # also trains grokviz/assets/tiny/tokenizer.model
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.util
import io
import json
import lzma
import random
import sys
import sysconfig
from pathlib import Path

from grokviz.corpus import CORPUS_PATH, load

TOKENIZER_DIR = CORPUS_PATH.parent.parent / "assets" / "tiny"

SEED = 20240317
VALIDATION_PERCENT = 5           # of source files (hash-based)
MAX_DOC_CHARS = 6000             # long files are cut into documents of at most this many characters
CODE_BUDGET = 3_600_000          # characters per domain (approximate)
PROSE_BUDGET = 2_400_000
NUMBERS_BUDGET = 1_200_000
# stdlib folders that are tests, vendored, generated or non-English-heavy; skipped
SKIP_DIRS = {"test", "tests", "site-packages", "idlelib", "lib2to3", "pydoc_data", "__pycache__", "ensurepip",
             "turtledemo", "encodings", "config-3.11-x86_64-linux-gnu", "tkinter", "distutils"}


def split_of(source: str) -> str:
    h = int(hashlib.sha256(source.encode()).hexdigest()[:8], 16)
    return "validation" if h % 100 < VALIDATION_PERCENT else "train"


def chunks(text: str, limit: int = MAX_DOC_CHARS) -> list[str]:
    """Cut text at blank lines into pieces of at most ``limit`` characters (a paragraph longer than that is cut
    at line breaks, then hard)."""
    out, cur = [], ""
    for para in text.split("\n\n"):
        piece = para + "\n\n"
        while len(piece) > limit:
            cut = piece.rfind("\n", 0, limit)
            cut = cut if cut > 0 else limit
            if cur:
                out.append(cur)
                cur = ""
            out.append(piece[:cut + 1])
            piece = piece[cut + 1:]
        if len(cur) + len(piece) > limit and cur:
            out.append(cur)
            cur = ""
        cur += piece
    if cur.strip():
        out.append(cur)
    return [c.strip("\n") + "\n" for c in out if c.strip()]


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if any(part in SKIP_DIRS for part in rel.parts[:-1]) or p.name.startswith(("test_", "_test")):
            continue
        files.append(p)
    return files


def _docstrings(tree: ast.AST) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 200 and sum(c.isalpha() for c in doc) > 0.6 * len(doc):
                out.append(doc)
    return out


def code_and_docstrings(files: list[Path], root: Path) -> tuple[list[dict], list[dict]]:
    """Interleave files by a seeded shuffle so the code budget samples the whole library, not the alphabet's
    first letters."""
    rng = random.Random(SEED)
    order = files[:]
    rng.shuffle(order)
    code, prose, n_code, n_prose = [], [], 0, 0
    for p in order:
        try:
            src = p.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (UnicodeDecodeError, SyntaxError):
            continue
        if not src.isascii():
            continue
        rel = str(p.relative_to(root))
        sp = split_of(rel)
        if n_code < CODE_BUDGET:
            # at most 3 documents per file so that many modules are represented
            for c in chunks(src)[:3]:
                code.append(dict(domain="code", source=f"cpython-stdlib/{rel}", split=sp, text=c))
                n_code += len(c)
        if n_prose < PROSE_BUDGET * 0.55:
            for d in _docstrings(tree):
                prose.append(dict(domain="prose", source=f"cpython-stdlib/{rel} (docstring)", split=sp,
                                  text=d.strip() + "\n"))
                n_prose += len(d)
    return code, prose


def pydoc_topics(root: Path) -> list[dict]:
    spec = importlib.util.spec_from_file_location("_topics", root / "pydoc_data" / "topics.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    docs = []
    for name in sorted(mod.topics):
        text = mod.topics[name]
        if not text.isascii():
            text = text.encode("ascii", "ignore").decode()
        src = f"cpython-docs/pydoc_data/topics.py#{name}"
        for c in chunks(text):
            docs.append(dict(domain="prose", source=src, split=split_of(src), text=c))
    return docs


def licence_text(root: Path) -> list[dict]:
    p = root / "LICENSE.txt"
    if not p.is_file():
        return []
    src = "cpython/LICENSE.txt"
    return [dict(domain="prose", source=src, split=split_of(src), text=c)
            for c in chunks(p.read_text(encoding="utf-8", errors="ignore"))]


# --- synthetic numbers ------------------------------------------------------------------------------------
def _arith(rng):
    lines = []
    op = rng.choice("+-*/")
    for _ in range(rng.randint(8, 20)):
        a, b = rng.randint(0, 999), rng.randint(1, 99)
        if op == "+":
            lines.append(f"{a} + {b} = {a + b}")
        elif op == "-":
            lines.append(f"{a} - {b} = {a - b}")
        elif op == "*":
            a = rng.randint(0, 99)
            lines.append(f"{a} * {b} = {a * b}")
        else:
            q = rng.randint(0, 99)
            lines.append(f"{q * b} / {b} = {q}")
    return "\n".join(lines)


def _sequence(rng):
    lines = []
    for _ in range(rng.randint(4, 10)):
        kind = rng.choice(["arith", "geom", "square", "fib"])
        n = rng.randint(6, 12)
        if kind == "arith":
            a, d = rng.randint(0, 200), rng.randint(1, 25)
            seq = [a + i * d for i in range(n)]
        elif kind == "geom":
            a, r = rng.randint(1, 9), rng.randint(2, 4)
            seq = [a * r ** i for i in range(min(n, 9))]
        elif kind == "square":
            a = rng.randint(0, 40)
            seq = [(a + i) ** 2 for i in range(n)]
        else:
            x, y = rng.randint(0, 9), rng.randint(1, 9)
            seq = []
            for _ in range(n):
                seq.append(x)
                x, y = y, x + y
        lines.append(", ".join(str(v) for v in seq))
    return "\n".join(lines)


def _table(rng):
    start = rng.randint(1, 60)
    cols = rng.choice([("n", "n^2", "n^3"), ("x", "2x", "3x", "10x"), ("n", "n!"), ("n", "2^n"), ("n", "n % 7")])
    rows = [" | ".join(cols)]
    for n in range(start, start + rng.randint(6, 14)):
        vals = {"n": n, "x": n, "n^2": n * n, "n^3": n ** 3, "2x": 2 * n, "3x": 3 * n, "10x": 10 * n,
                "n % 7": n % 7}
        if "n!" in cols:
            n = n % 15
            f = 1
            for i in range(2, n + 1):
                f *= i
            vals = {"n": n, "n!": f}
        if "2^n" in cols:
            n = n % 40
            vals = {"n": n, "2^n": 2 ** n}
        rows.append(" | ".join(str(vals[c]) for c in cols))
    return "\n".join(rows)


def _money(rng):
    lines = []
    total = 0
    for i in range(rng.randint(5, 12)):
        qty, cents = rng.randint(1, 12), rng.randint(50, 9999)
        amount = qty * cents
        total += amount
        lines.append(f"item {i + 1}: {qty} x {cents // 100}.{cents % 100:02d} = {amount // 100}.{amount % 100:02d}")
    lines.append(f"total = {total // 100}.{total % 100:02d}")
    return "\n".join(lines)


def numbers_docs() -> list[dict]:
    rng = random.Random(SEED + 1)
    gens = [_arith, _sequence, _table, _money]
    docs, n = [], 0
    i = 0
    while n < NUMBERS_BUDGET:
        g = gens[i % len(gens)]
        text = g(rng) + "\n"
        src = f"synthetic/{g.__name__.strip('_')}/{i}"
        docs.append(dict(domain="numbers", source=src, split=split_of(src), text=text))
        n += len(text)
        i += 1
    return docs


def build(out: Path = CORPUS_PATH) -> dict:
    root = Path(sysconfig.get_paths()["stdlib"])
    code, doc_prose = code_and_docstrings(stdlib_files(), root)
    prose = pydoc_topics(root) + licence_text(root) + doc_prose
    docs = code + prose + numbers_docs()
    for i, d in enumerate(docs):
        d["id"] = i
    buf = io.BytesIO()
    with lzma.open(buf, "wb", preset=9 | lzma.PRESET_EXTREME) as f:
        for d in docs:
            row = {"id": d["id"], "domain": d["domain"], "source": d["source"], "split": d["split"], "text": d["text"]}
            f.write((json.dumps(row, ensure_ascii=True) + "\n").encode())
    out.write_bytes(buf.getvalue())
    stats = {}
    for d in docs:
        s = stats.setdefault(f"{d['domain']}/{d['split']}", [0, 0])
        s[0] += 1
        s[1] += len(d["text"])
    return {"path": str(out), "bytes": out.stat().st_size, "sha256": sha256(out), "stats": stats,
            "python": sys.version.split()[0]}


def sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


TOKENIZER_OPTIONS = dict(
    model_type="bpe", vocab_size=4096, character_coverage=1.0, byte_fallback=True, split_digits=True,
    pad_id=0, unk_id=3, bos_id=1, eos_id=2,  # Grok-1: pad 0, eos 2
    pad_piece="[PAD]", bos_piece="[BOS]", eos_piece="[EOS]", unk_piece="[UNK]",
    normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
    user_defined_symbols=["\n", "\t"], split_by_whitespace=True, max_sentence_length=1 << 16,
    num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, minloglevel=2,
)


def train_tokenizer(corpus=CORPUS_PATH, out_dir=TOKENIZER_DIR, vocab_size: int = 4096) -> Path:
    """Train the BPE SentencePiece model on the training split (deterministic: one thread, no sampling)."""
    import sentencepiece as spm

    docs = load(corpus, split="train")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    # one "sentence" per line-group: sentencepiece splits its input on newlines, so feed documents with
    # newlines kept inside by iterating over paragraphs
    def sentences():
        for d in docs:
            for para in d["text"].split("\n\n"):
                if para.strip():
                    yield para[:60000] + "\n"
    spm.SentencePieceTrainer.train(sentence_iterator=sentences(), model_writer=model,
                                   **{**TOKENIZER_OPTIONS, "vocab_size": vocab_size})
    path = out_dir / "tokenizer.model"
    path.write_bytes(model.getvalue())
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(CORPUS_PATH))
    ap.add_argument("--tokenizer", action="store_true", help="also train the SentencePiece tokenizer")
    ap.add_argument("--tokenizer-only", action="store_true")
    args = ap.parse_args(argv)
    if not args.tokenizer_only:
        info = build(Path(args.out))
        print(json.dumps(info, indent=1))
    if args.tokenizer or args.tokenizer_only:
        p = train_tokenizer(Path(args.out))
        print("tokenizer:", p, sha256(p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
