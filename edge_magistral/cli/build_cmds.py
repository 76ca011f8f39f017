"""``build``: checkpoint → GGUF quantizations with a manifest, and ``verify`` of an output directory."""

from __future__ import annotations

from pathlib import Path

import click

from edge_magistral.cli.group import cli
from edge_magistral.cli.render import RichProgress, console
from edge_magistral.units import GiB


@cli.command()
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--quants", default="Q4_K_M,Q5_K_M,Q6_K,Q8_0", show_default=True,
              help="Comma-separated llama.cpp file types (any llama.cpp ftype name).")
@click.option("--base-type", type=click.Choice(["BF16", "F16", "F32"]), default="BF16", show_default=True,
              help="Type of the converted GGUF the quants are made from.")
@click.option("--name", default=None, help="Basename of the output files (default: the source's name).")
@click.option("--imatrix", type=click.Path(path_type=Path), default=None,
              help="Importance matrix (llama.cpp imatrix GGUF or legacy .dat).")
@click.option("--threads", type=int, default=None, help="Quantizer threads (default: all cores).")
def build(src: Path, out: Path, quants: str, base_type: str, name: str | None, imatrix: Path | None,
          threads: int | None) -> None:
    """Convert SRC (a Mistral-native or HF checkpoint directory, or a BF16/F16 GGUF) into GGUF
    quantizations in OUT, with a verified manifest.json. Reruns skip finished outputs."""
    import llama_cpp  # noqa: F401  before numpy (the pipeline's): the other order broke CUDA loads

    from edge_magistral.build.pipeline import BuildRequest
    from edge_magistral.build.pipeline import build as run_build

    req = BuildRequest(src=src, out=out, quants=quants.split(","), base_type=base_type, name=name,
                       imatrix=imatrix, nthread=threads)
    with RichProgress() as progress:
        result = run_build(req, progress)
    for e in result.manifest.files:
        state = "built" if e.quant in result.built else "kept"
        console().print(f"{state:6} {e.file}  {e.size / GiB:6.2f} GiB  sha256 {e.sha256[:16]}…")
    console().print(f"manifest: {out / 'manifest.json'}")


@cli.command()
@click.argument("directory", type=click.Path(path_type=Path), required=False)
@click.option("--store", "store_dir", default=None, type=click.Path(file_okay=False),
              help="Model store to verify when no DIRECTORY is given (default: the usual one).")
def verify(directory: Path | None, store_dir: str | None) -> None:
    """Re-hash every file a manifest.json lists and report mismatches (exit 4 if any): DIRECTORY
    (a build's output), or the model store when none is given."""
    from edge_magistral.build import manifest as mf
    from edge_magistral.errors import CorruptModelError, ModelNotFoundError

    if directory is None:
        from edge_magistral.store import Store

        directory = Store.default(store_dir).root
        if not (directory / mf.MANIFEST).is_file():
            raise ModelNotFoundError(f"the model store at {directory} holds no models yet: "
                                     "`edge-magistral pull` or `edge-magistral import DIR`")
    m = mf.load(directory)
    with RichProgress() as progress:
        problems = mf.verify(directory, progress.task("verifying", sum(e.size for e in m.files)))
    for p in problems:
        console().print(f"[red]{p.problem:8}[/red] {p.file} {p.detail}")
    if problems:
        raise CorruptModelError(f"{directory}: {len(problems)} file(s) do not match the manifest; "
                                "rebuild, pull or import them again")
    console().print(f"ok: {len(m.files)} file(s) match {directory / 'manifest.json'}")
