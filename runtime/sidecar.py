"""Reading an export folder's `ressformer.json` (the sidecar): every check the runtime makes before it
opens a graph, in one place, for every command (the JavaScript runtime's `checkSidecar` makes the same).

Messages name the file and the field: `.../ressformer.json: generation.temperature must be ...`."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from .sampling import check_option

SIDECAR = "ressformer.json"
FORMAT = "ressformer-export"
KNOWN_FORMAT_VERSIONS = (3,)  # 3: per-step state buffers (docs/runtime-contract.md)
KNOWN_RESSFORMER_OPSETS = (1,)
TOKENIZERS = ("bytes",)
REQUIRED = ("config", "graphs", "steps", "tokenizer", "checkpoint_sha256", "unrolled", "model_sha256")
GENERATION_FALLBACK = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "max_new_tokens": 64,
                       "repetition_penalty": 1.0, "stop": []}
REEXPORT = "re-export the checkpoint"


STEP_GRAPHS = ("embed", "step", "head", "memory")  # the steps path (any K); optional (export --step-graphs)


class ModelError(ValueError):
    """The export folder is missing, corrupted, or of a version this runtime does not know."""


# The writers' protocol (ressformer/fsutil.py, `replace_dir` and `recover`): a folder NAME is replaced
# by renaming it to `.NAME.old-PID`, then the new one to NAME. A writer killed between the two renames
# leaves only the backup. Readers restore it here, by the same rule as fsutil.recover (only a backup
# whose writer is no longer running, only when NAME is missing); the runtime cannot import fsutil.
_BACKUP = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def recover_folder(folder: str | os.PathLike) -> bool:
    """Put back the backup an interrupted replacement of `folder` left; True if it did."""
    final = Path(folder).absolute()
    if final.exists() or final.is_symlink() or not final.parent.is_dir():
        return False
    for p in final.parent.iterdir():
        m = _BACKUP.match(p.name)
        if m and m["name"] == final.name and p.is_dir() and not _pid_alive(int(m["pid"])):
            try:
                os.replace(p, final)
            except OSError:  # another reader restored it first
                pass
            return final.is_dir()
    return False


def model_hash(meta: dict) -> str:
    """sha256 of the sidecar's model fields as canonical JSON: the exporter's `model_hash`."""
    fields = {k: v for k, v in meta.items() if k not in ("model_sha256", "generation")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def read_sidecar(folder: str | os.PathLike) -> dict:
    """The checked sidecar of the export folder `folder` (ModelError naming the file and field)."""
    folder = Path(folder)
    recover_folder(folder)
    if not folder.is_dir():
        raise ModelError(f"export folder {folder} does not exist or is not a folder")
    path = folder / SIDECAR
    if not path.is_file():
        raise ModelError(f"{folder} has no {SIDECAR}: not a ressformer export folder (make one with "
                         "`ressformer export CHECKPOINT --out FOLDER`)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is corrupted: {e}; {REEXPORT}") from e
    if not isinstance(meta, dict):
        raise ModelError(f"{path} is not a ressformer sidecar (a JSON object is expected); {REEXPORT}")
    version = meta.get("format_version")
    if meta.get("format") == FORMAT and isinstance(version, int) and not isinstance(version, bool) \
            and version < min(KNOWN_FORMAT_VERSIONS):
        raise ModelError(f"{path}: export format version {version} is older than this runtime's "
                         f"{max(KNOWN_FORMAT_VERSIONS)} (its graphs use another state layout); re-export the "
                         "checkpoint: ressformer export CHECKPOINT --out FOLDER")
    if meta.get("format") != FORMAT or version not in KNOWN_FORMAT_VERSIONS:
        raise ModelError(f"{path}: unknown export format {meta.get('format')!r} version "
                         f"{meta.get('format_version')!r}; this runtime reads {FORMAT} {KNOWN_FORMAT_VERSIONS} "
                         "(re-export the checkpoint with this version)")
    ops = meta.get("ressformer_opset", {})
    if not isinstance(ops, dict) or ops.get("version") not in KNOWN_RESSFORMER_OPSETS:
        raise ModelError(f"{path}: unknown ressformer op-set version "
                         f"{ops.get('version') if isinstance(ops, dict) else ops!r}; this runtime knows versions "
                         f"{KNOWN_RESSFORMER_OPSETS}")
    for key in REQUIRED:
        if key not in meta:
            raise ModelError(f"{path} has no {key!r} entry; {REEXPORT}")
    if model_hash(meta) != meta["model_sha256"]:
        raise ModelError(f"{path} was edited: its model fields no longer match model_sha256 (only the "
                         f"'generation' defaults may be edited); {REEXPORT}")
    for key in ("config", "graphs", "unrolled", "tokenizer"):
        if not isinstance(meta[key], dict):
            raise ModelError(f"{path}: {key} must be a JSON object; {REEXPORT}")
    steps = set(STEP_GRAPHS) & set(meta["graphs"])  # the step graphs are optional, all four or none
    missing = {"init"} - set(meta["graphs"]) | (set(STEP_GRAPHS) - steps if steps else set())
    missing |= {n for names in meta["unrolled"].values() for n in names.values()} - set(meta["graphs"])
    if missing:
        raise ModelError(f"{path} names no graph for {sorted(missing)}; {REEXPORT}")
    if meta["tokenizer"].get("type") not in TOKENIZERS:
        raise ModelError(f"{path}: tokenizer.type {meta['tokenizer'].get('type')!r} is unknown; this runtime "
                         f"knows {list(TOKENIZERS)}")
    meta["generation"] = check_generation(meta.get("generation", {}), path)
    return meta


def check_generation(gen, path) -> dict:
    """The sidecar's `generation` defaults, checked against the sampling rules, over the fallback."""
    fix = "fix it or delete the field to use the built-in defaults"
    if not isinstance(gen, dict):
        raise ModelError(f"{path}: generation must be a JSON object of defaults ({', '.join(GENERATION_FALLBACK)}), "
                         f"got {json.dumps(gen)}; {fix}")
    unknown = sorted(set(gen) - set(GENERATION_FALLBACK))
    if unknown:
        raise ModelError(f"{path}: generation.{unknown[0]} is not a generation option; known: "
                         f"{', '.join(GENERATION_FALLBACK)}")
    for name, value in gen.items():
        label = f"{path}: generation.{name}"
        if name == "stop":
            if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                raise ModelError(f"{label} must be a list of strings, got {json.dumps(value)}; {fix}")
        else:
            try:
                check_option(name, value, label, ModelError)
            except ModelError as e:
                raise ModelError(f"{e}; {fix}") from None
    return {**GENERATION_FALLBACK, **gen}
