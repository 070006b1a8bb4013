"""llama.cpp's own tools (llama-bench, llama-completion), built from the very sources the kit's
llama-cpp-python was built from, and made to run exactly one CPU kernel variant.

- Build: none of its own. build/base.py builds llama.cpp once per platform (build/llama-cpp.env):
  the kit's libraries, every CPU variant and these tools, from the source vendored in the pinned
  llama-cpp-python sdist. The kernel each run uses comes from the kit's llama_cpp/lib.
- One kernel: ggml_backend_load_all() scores every libggml-cpu-*.so in the executable's folder and
  the current folder and loads the best. A folder per variant holding a copy of the tools and only
  that variant's library (copied from the kit's llama_cpp/lib), run from that folder, leaves it no
  other choice; the "loaded CPU backend from ..." line it logs is checked after every run.
- Same libraries: LD_LIBRARY_PATH points at the kit's llama_cpp/lib, so libllama and libggml are
  the kit's own files too; only the front end differs (checked with ldd, see `linked_libllama`).
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT, ensure_cache

TOOLS = ("llama-bench", "llama-completion")
_LOADED = re.compile(r"loaded CPU backend from (\S+)")


@functools.cache
def build_tools() -> Path:
    """The folder holding the tools: this platform's one llama.cpp build (build/base.py), whose
    libraries the kit's llama_cpp/lib holds too."""
    out = subprocess.run([sys.executable, str(ROOT / "build" / "base.py"), "llama-dir"], capture_output=True,
                         text=True, check=True)
    binaries = Path(out.stdout.strip())
    missing = [t for t in TOOLS if not (binaries / t).is_file()]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} missing from {binaries}: run `bash build/install.sh`")
    return binaries


def variant_dir(variant_lib: Path) -> Path:
    """A folder with the tools and this one kernel library, nothing else ggml could pick."""
    binaries = build_tools()
    name = variant_lib.name.removeprefix("libggml-cpu-").removesuffix(".so")
    folder = ensure_cache() / "one-kernel" / name
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("libggml-cpu*"):
        if stale.name != variant_lib.name:
            stale.unlink()
    # Copies, not links: ggml finds "its" folder through /proc/self/exe, which resolves links.
    for source in [*(binaries / t for t in TOOLS), variant_lib]:
        target = folder / source.name
        if not target.exists() or target.stat().st_mtime < source.stat().st_mtime:
            shutil.copy2(source, target)
    return folder


def tool_env(kit_lib: Path) -> dict[str, str]:
    # The kit's libllama and libggml first; the tools' own libraries (lib*-impl, libllama-common)
    # from the build. ggml looks for CPU kernels beside the executable, not on this path.
    env = dict(os.environ, LD_LIBRARY_PATH=f"{kit_lib}{os.pathsep}{build_tools()}")
    env.pop("GGML_BACKEND_PATH", None)  # would load one more backend on top of the folder's
    return env


def linked_libllama(folder: Path, kit_lib: Path) -> str:
    """Which libllama the tools get under tool_env (ldd), to show it is the kit's own file."""
    out = subprocess.run(["ldd", str(folder / "llama-bench")], capture_output=True, text=True,
                         env=tool_env(kit_lib)).stdout
    match = re.search(r"libllama\.so\S*\s+=>\s+(\S+)", out)
    return match.group(1) if match else "not found"


def loaded_backend(stderr: str) -> str | None:
    match = _LOADED.search(stderr)
    return match.group(1) if match else None


def check_backend(stderr: str, folder: Path, variant_lib: Path) -> str:
    """The path ggml says it loaded; raises when it is not the one variant we put there."""
    loaded = loaded_backend(stderr)
    if loaded is None or Path(loaded).name != variant_lib.name:
        raise RuntimeError(f"llama.cpp loaded {loaded!r}, not {variant_lib.name} from {folder}")
    return loaded


@dataclass(frozen=True)
class BenchResult:
    prompt_tps: float  # best repetition, as kit.engine.benchmark reports its best
    gen_tps: float
    backend: str


def llama_bench(folder: Path, kit_lib: Path, variant_lib: Path, model: Path, *, threads: int,
                prompt_tokens: int, gen_tokens: int, repeats: int) -> BenchResult:
    """Prompt at depth 0, then generation at depth `prompt_tokens`: what the kit's benchmark does
    (it generates right after its prompt). Two runs, as one run would time every combination."""
    prompt = _llama_bench_test(folder, kit_lib, variant_lib, model, threads, repeats,
                               n_prompt=prompt_tokens, n_gen=0, n_depth=0)
    gen = _llama_bench_test(folder, kit_lib, variant_lib, model, threads, repeats,
                            n_prompt=0, n_gen=gen_tokens, n_depth=prompt_tokens)
    return BenchResult(prompt[0], gen[0], gen[1])


def _llama_bench_test(folder: Path, kit_lib: Path, variant_lib: Path, model: Path, threads: int, repeats: int,
                      **test: int) -> tuple[float, str]:
    """Best tok/s of one llama-bench test, and the kernel it loaded. Flash attention off, as in
    llama-cpp-python's default."""
    cmd = [str(folder / "llama-bench"), "-m", str(model), "-t", str(threads), "-p", str(test["n_prompt"]),
           "-n", str(test["n_gen"]), "-d", str(test["n_depth"]), "-r", str(repeats), "-fa", "0", "-o", "json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=folder, env=tool_env(kit_lib),
                          stdin=subprocess.DEVNULL, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"llama-bench failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
    backend = check_backend(proc.stderr, folder, variant_lib)
    for t in json.loads(proc.stdout):
        if all(t.get(k) == v for k, v in test.items()):
            return max(t["samples_ts"]), backend  # the best repetition, as engine.benchmark keeps
    raise RuntimeError(f"llama-bench printed no test with {test}")


def completion_command(folder: Path, model: Path, prompt: str, *, threads: int, max_tokens: int,
                       ctx: int) -> list[str]:
    """llama-completion answering one prompt, printing only the answer (its logs go to stderr).
    No warm-up run: the fastest start llama.cpp's own CLI has."""
    return [str(folder / "llama-completion"), "-m", str(model), "-p", prompt, "-n", str(max_tokens),
            "-t", str(threads), "-c", str(ctx), "--no-display-prompt", "--no-warmup", "-no-cnv",
            "--temp", "0.3", "--repeat-penalty", "1.1", "-s", "1"]
