"""perf_analyzer concurrency sweep over every served model, with real input data.

    python -m benchmarks.perf_analyzer.run                        # embedded Triton on model_repository
    python -m benchmarks.perf_analyzer.run --url 127.0.0.1:8001   # a running server (gRPC host:port)

Getting the real perf_analyzer (docs/platform.md): PyPI's ``perf-analyzer`` 2.60 wheel carries the
binary but is tagged ``manylinux_2_38``; pip on a glibc 2.36 machine only sees a placeholder,
and the binary needs glibc 2.38 / GLIBCXX_3.4.32. So, once, into a cache folder
(``~/.cache/triton-recsys/perf_analyzer`` by default):

1. ``pip download --no-deps --only-binary=:all: --python-version 3.11 --platform
   manylinux_2_38_x86_64 perf-analyzer==2.60.0`` and unzip ``perf_analyzer/bin/perf_analyzer``;
2. ``apt-get download libc6 libstdc++6 libgcc-s1`` from Debian 13 (trixie) through a
   *separate* sources file and private state/cache folders (the machine's apt setup is
   not touched), then ``dpkg -x`` each package into a private ``root/``. Nothing goes into
   ``/``: the binary runs under that root's own loader,
   ``root/.../ld-linux-x86-64.so.2 --library-path root/usr/lib/x86_64-linux-gnu perf_analyzer``.

Each step is skipped when its result is already in the cache, and each result is built
under a temporary name and renamed, so an interrupted download is redone, never half-used.

The sweep: for each model, perf_analyzer runs at each concurrency (default 1, 2, 4, 8) over
gRPC with ``--input-data inputs/<model>.json`` and ``-b`` from ``inputs/meta.json`` (1 for
the towers, one user's candidates for the ranker models), writing ``-f`` CSVs. Per model the
rows are merged into ``<out>/<model>.csv`` (perf_analyzer's own columns); the summary table
(model, batch, concurrency, infer/s, requests/s, p50/p99 latency) is printed and written to
``<out>/summary.md`` / ``summary.json`` with the conditions.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import cpu_model
from benchmarks.perf_analyzer.make_inputs import CPU_CONFIG, MODELS, input_specs, read_config
from benchmarks.perf_analyzer.make_inputs import DEFAULT_OUT as DEFAULT_INPUTS

PERF_ANALYZER_VERSION = "2.60.0"
WHEEL_PLATFORM = "manylinux_2_38_x86_64"
DEBIAN_SUITE = "trixie"
DEBIAN_PACKAGES = ("libc6", "libstdc++6", "libgcc-s1")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
LIBDIR = "usr/lib/x86_64-linux-gnu"


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer could not be fetched, prepared or run."""


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/triton-recsys/perf_analyzer`` (``~/.cache/...`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "triton-recsys" / "perf_analyzer"


@dataclass(frozen=True)
class PerfAnalyzer:
    """A runnable perf_analyzer: the binary and the private glibc it runs under.

    Attributes:
        binary: The perf_analyzer executable from the wheel.
        root: The folder the Debian 13 packages were unpacked into.
    """

    binary: Path
    root: Path

    @property
    def loader(self) -> Path:
        return self.root / LIBDIR / "ld-linux-x86-64.so.2"

    def command(self, *args: str) -> list[str]:
        """The command line running perf_analyzer with ``args`` under the private loader."""
        return [str(self.loader), "--library-path", str(self.root / LIBDIR), str(self.binary), *args]

    def version(self) -> str:
        """``perf_analyzer --version``'s first line (also proves the binary starts)."""
        proc = subprocess.run(self.command("--version"), capture_output=True, text=True, timeout=60)
        text = (proc.stdout + proc.stderr).strip()
        if proc.returncode != 0:
            raise PerfAnalyzerError(f"perf_analyzer --version failed ({proc.returncode}): {text}")
        # the wheel's build reports "Version 0.0.0 (commit ...)": the wheel version says more
        return f"{self.binary.parent.name} ({text.splitlines()[0]})" if text else self.binary.parent.name


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PerfAnalyzerError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def _fresh_dir(parent: Path, name: str) -> Path:
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would survive the rename into the shared cache
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    """Renames a finished temporary folder into place (a concurrent winner is kept)."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_binary(cache: Path, version: str = PERF_ANALYZER_VERSION) -> Path:
    """The perf_analyzer binary of the PyPI wheel, downloaded and unpacked once."""
    final = cache / f"perf_analyzer-{version}"
    binary = final / "perf_analyzer"
    if binary.is_file():
        return binary
    tmp = _fresh_dir(cache, f"perf_analyzer-{version}")
    try:
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                "3.11",
                "--platform",
                WHEEL_PLATFORM,
                f"perf-analyzer=={version}",
                "-d",
                str(tmp / "wheel"),
                "--quiet",
            ]
        )
        wheels = list((tmp / "wheel").glob("perf_analyzer-*.whl"))
        if not wheels:
            raise PerfAnalyzerError(f"pip downloaded no perf_analyzer wheel into {tmp / 'wheel'}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            with wheel.open("perf_analyzer/bin/perf_analyzer") as src, open(tmp / "perf_analyzer", "wb") as dst:
                shutil.copyfileobj(src, dst)
        (tmp / "perf_analyzer").chmod(0o755)
        shutil.rmtree(tmp / "wheel")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, final)
    return binary


def debian_source() -> tuple[str, str]:
    """(mirror URI, keyring) of the machine's own Debian entry, so trixie comes from the same place."""
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.is_file():
        uri = keyring = None
        for block in sources.read_text().split("\n\n"):
            fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line and not line.lstrip().startswith("#"))
            fields = {k.strip(): v.strip() for k, v in fields.items()}
            if "security" not in fields.get("URIs", "") and fields.get("URIs"):
                uri, keyring = fields["URIs"].split()[0], fields.get("Signed-By", DEFAULT_KEYRING)
                break
        if uri:
            return uri, keyring or DEFAULT_KEYRING
    legacy = Path("/etc/apt/sources.list")
    if legacy.is_file():
        for line in legacy.read_text().splitlines():
            parts = line.split()
            if parts[:1] == ["deb"] and "security" not in line:
                uri = next((p for p in parts[1:] if p.startswith(("http://", "https://"))), None)
                if uri:
                    return uri, DEFAULT_KEYRING
    return DEFAULT_MIRROR, DEFAULT_KEYRING


def fetch_libraries(cache: Path) -> Path:
    """Debian 13's glibc and libstdc++ unpacked into a private root, once; returns the root."""
    final = cache / "debian13-root"
    if (final / LIBDIR / "ld-linux-x86-64.so.2").is_file() and (final / LIBDIR / "libstdc++.so.6").exists():
        return final
    if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
        raise PerfAnalyzerError("apt-get and dpkg are needed to fetch Debian 13's glibc for perf_analyzer")
    tmp = _fresh_dir(cache, "debian13-root")
    try:
        apt = tmp / "apt"
        for sub in ("lists/partial", "cache/archives/partial", "debs"):
            (apt / sub).mkdir(parents=True)
        uri, keyring = debian_source()
        sources = apt / f"{DEBIAN_SUITE}.sources"
        sources.write_text(f"Types: deb\nURIs: {uri}\nSuites: {DEBIAN_SUITE}\nComponents: main\nSigned-By: {keyring}\n")
        # every path apt would write is private: the machine's lists, caches and dpkg status stay as they are
        options = [
            "-o",
            f"Dir::Etc::sourcelist={sources}",
            "-o",
            "Dir::Etc::sourceparts=/dev/null",
            "-o",
            f"Dir::State::Lists={apt / 'lists'}",
            "-o",
            f"Dir::Cache={apt / 'cache'}",
            "-o",
            "Dir::State::status=/dev/null",
            "-o",
            "APT::Sandbox::User=root",
            "-q",
        ]
        _run(["apt-get", *options, "update"])
        _run(["apt-get", *options, "download", *DEBIAN_PACKAGES], cwd=apt / "debs")
        root = tmp / "root"
        root.mkdir()
        for deb in sorted((apt / "debs").glob("*.deb")):
            _run(["dpkg", "-x", str(deb), str(root)])
        if not (root / LIBDIR / "ld-linux-x86-64.so.2").is_file():
            raise PerfAnalyzerError(f"no {LIBDIR}/ld-linux-x86-64.so.2 after unpacking {DEBIAN_PACKAGES}")
        shutil.rmtree(apt)
        # the root is the final folder's content; debs and lists are not kept
        for item in root.iterdir():
            item.rename(tmp / item.name)
        root.rmdir()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, final)
    return final


def ensure_perf_analyzer(cache: Path | None = None) -> PerfAnalyzer:
    """A working perf_analyzer from the cache, fetching what is missing (see the module docstring)."""
    cache = cache or default_cache()
    pa = PerfAnalyzer(binary=fetch_binary(cache), root=fetch_libraries(cache))
    pa.version()
    return pa


# --------------------------------------------------------------------------- the sweep


def entry_fits(value: Any, dims: list[int]) -> bool:
    """Whether one input of an ``--input-data`` entry fits a config's dims.

    A flat list is one batch row of ``dims``; ``{"content", "shape"}`` (models without a batch
    axis, whose dims hold ``-1``) is a whole tensor whose shape must match ``dims``.
    """
    if isinstance(value, dict):
        shape, content = value.get("shape"), value.get("content")
        if not isinstance(shape, list) or not isinstance(content, list) or len(shape) != len(dims):
            return False
        size = 1
        for d in shape:
            size *= d
        return all(d == -1 or d == s for d, s in zip(dims, shape)) and len(content) == size
    want = 1
    for d in dims:
        want *= d
    return isinstance(value, list) and len(value) == want


def check_inputs(inputs: Path, repo: Path | None, models: list[str]) -> dict[str, Any]:
    """``meta.json`` of the input folder, checked against the repository's configs when given.

    Raises:
        PerfAnalyzerError: A file is missing or its shapes differ from the served configs
            (regenerate with ``make_inputs``).
    """
    meta_path = inputs / "meta.json"
    if not meta_path.is_file():
        raise PerfAnalyzerError(f"{meta_path} missing: run python -m benchmarks.perf_analyzer.make_inputs --out {inputs}")
    meta = json.loads(meta_path.read_text())
    for model in models:
        if not (inputs / f"{model}.json").is_file():
            raise PerfAnalyzerError(f"{inputs / (model + '.json')} missing")
        if repo is not None and (repo / model / CPU_CONFIG).is_file():
            first = json.loads((inputs / f"{model}.json").read_text())["data"][0]
            for name, (_, dims) in input_specs(read_config(repo / model / CPU_CONFIG)).items():
                if not entry_fits(first.get(name), dims):
                    raise PerfAnalyzerError(
                        f"{inputs / (model + '.json')}: input {name} does not match {repo / model / CPU_CONFIG} "
                        f"(dims {dims}); regenerate with python -m benchmarks.perf_analyzer.make_inputs"
                    )
    return meta


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    """perf_analyzer's ``-f`` CSV: one row per measured concurrency."""
    with open(path, newline="") as fh:
        return [row for row in csv.DictReader(fh) if row.get("Concurrency")]


def measure(
    pa: PerfAnalyzer,
    model: str,
    url: str,
    input_file: Path,
    batch_size: int,
    concurrency: int,
    out_dir: Path,
    measurement_ms: int,
    max_trials: int,
    stability: int,
) -> list[dict[str, str]]:
    """One perf_analyzer run: ``model`` at one concurrency; returns its CSV rows."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"c{concurrency}.csv"
    args = [
        "-m",
        model,
        "-u",
        url,
        "-i",
        "grpc",
        "--input-data",
        str(input_file),
        "-b",
        str(batch_size),
        "--concurrency-range",
        f"{concurrency}:{concurrency}",
        "--max-threads",
        str(max(4, concurrency)),
        "-p",
        str(measurement_ms),
        "-r",
        str(max_trials),
        "-s",
        str(stability),
        "-f",
        str(csv_path),
    ]
    cmd = pa.command(*args)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (out_dir / f"c{concurrency}.log").write_text(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr)
    if proc.returncode != 0 or not csv_path.is_file():
        # perf_analyzer exits non-zero when it cannot stabilise; its last window is still logged
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise PerfAnalyzerError(f"perf_analyzer {model} c={concurrency} failed ({proc.returncode}):\n{tail}")
    return read_csv_rows(csv_path)


def _merge_csv(parts: list[Path], target: Path) -> None:
    """Concatenates per-concurrency CSVs under one header (perf_analyzer's columns unchanged)."""
    header, rows = None, []
    for part in parts:
        with open(part, newline="") as fh:
            reader = csv.reader(fh)
            head = next(reader, None)
            header = header or head
            rows += [r for r in reader if r and r[0].strip().isdigit()]
    with open(target, "w", newline="") as fh:
        writer = csv.writer(fh)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


def summarise(model: str, batch: int, row: dict[str, Any]) -> dict[str, Any]:
    """The table's row from a perf_analyzer CSV row (latencies are µs in the CSV)."""
    infer_s = float(row["Inferences/Second"])
    out = {
        "model": model,
        "batch": batch,
        "concurrency": int(row["Concurrency"]),
        "infer_per_s": round(infer_s, 1),
        "requests_per_s": round(infer_s / batch, 1),
        "p50_us": int(float(row["p50 latency"])),
        "p99_us": int(float(row["p99 latency"])),
    }
    if "_window_ms" in row:  # how the point was measured, when a retry changed it
        out["window_ms"], out["stability_pct"] = int(row["_window_ms"]), int(row["_stability"])
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table of the summary rows."""
    lines = [
        "| model | batch | concurrency | infer/s | requests/s | p50 µs | p99 µs | window ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['concurrency']} | {r['infer_per_s']:,.1f} | "
            f"{r['requests_per_s']:,.1f} | {r['p50_us']:,} | {r['p99_us']:,} | {r.get('window_ms', '-')} |"
        )
    return "\n".join(lines)


def conditions(pa: PerfAnalyzer, server: Any, url: str, args: argparse.Namespace, meta: dict) -> dict[str, Any]:
    """What the figures depend on, written beside them."""
    cpu = cpu_model()
    try:
        from export.pipeline import git_sha

        sha = git_sha()
    except Exception:  # conditions are informative; never fail a finished sweep over them
        sha = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "server": "embedded Triton (nvidia-pytriton tritonserver), --model-config-name=cpu: Python backend + onnxruntime, 1 instance, 1 intra-op thread per model"
        if server is not None
        else f"external Triton at {url}",
        "perf_analyzer": pa.version(),
        "protocol": "grpc",
        "measurement_ms": args.measurement_interval,
        "max_trials": args.max_trials,
        "stability_percentage": args.stability,
        "inputs": str(args.inputs),
        "inputs_meta": {k: meta.get(k) for k in ("n_items", "history_len", "n_features", "candidates", "model_version")},
        "git_sha": sha,
        # the machine may be shared: the load says how much else was running
        "load_average_1_5_15_at_end": [round(x, 2) for x in os.getloadavg()],
        "load_average_1_5_15_at_start": args.load_at_start,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", default="model_repository", help="model repository for the embedded Triton and the input check")
    parser.add_argument("--url", default=None, help="Triton gRPC host:port (default: start the embedded Triton)")
    parser.add_argument(
        "--inputs", type=Path, default=DEFAULT_INPUTS, help="folder from make_inputs (default: the checked-in ml-latest-small set)"
    )
    parser.add_argument("--out", type=Path, default=Path("reports/perf_analyzer"), help="CSV and summary folder (default: %(default)s)")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: all five)")
    parser.add_argument("--concurrency", default="1,2,4,8", help="comma-separated sweep (default: %(default)s)")
    parser.add_argument("--batch-size", action="append", default=[], metavar="MODEL=B", help="override -b for a model (repeatable)")
    parser.add_argument("--measurement-interval", type=int, default=3000, help="-p in ms (default: %(default)s)")
    parser.add_argument("--max-trials", type=int, default=6, help="-r (default: %(default)s)")
    parser.add_argument("--stability", type=int, default=15, help="-s percentage (default: %(default)s; a shared 2-core machine is noisy)")
    parser.add_argument("--retries", type=int, default=1, help="re-measure an unstable point with a 2x window (default: %(default)s)")
    parser.add_argument(
        "--cache", type=Path, default=None, help="perf_analyzer cache folder (default: ~/.cache/triton-recsys/perf_analyzer)"
    )
    parser.add_argument("--fetch-only", action="store_true", help="fetch perf_analyzer and its libraries, print the version, exit")
    args = parser.parse_args(argv)
    args.load_at_start = [round(x, 2) for x in os.getloadavg()]

    try:
        pa = ensure_perf_analyzer(args.cache)
    except PerfAnalyzerError as exc:
        print(f"perf_analyzer: {exc}", file=sys.stderr)
        return 1
    if args.fetch_only:
        print(json.dumps({"binary": str(pa.binary), "root": str(pa.root), "version": pa.version()}, indent=2))
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    repo = Path(args.repo) if args.repo else None
    try:
        meta = check_inputs(args.inputs, repo, models)
    except PerfAnalyzerError as exc:
        print(f"perf_analyzer: {exc}", file=sys.stderr)
        return 1
    batch = {m: int(meta["models"][m]["batch_size"]) for m in models}
    for override in args.batch_size:
        name, _, value = override.partition("=")
        batch[name] = int(value)

    server = None
    url = args.url
    if url is None:
        from orchestrator.tritonserver import EmbeddedTriton

        server = EmbeddedTriton(args.repo).start()
        url = server.grpc_url
    rows: list[dict[str, Any]] = []
    failures: list[str] = []
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        for model in models:
            parts = []
            for c in levels:
                print(f"perf_analyzer: {model} -b {batch[model]} concurrency {c} ...", file=sys.stderr, flush=True)
                found = None
                for attempt in range(args.retries + 1):
                    # an unstable point (a busy shared machine) is retried with a window twice
                    # as long and a looser stability bound before it counts as a failure
                    window = args.measurement_interval * 2**attempt
                    stability = args.stability + 10 * attempt
                    try:
                        found = measure(
                            pa,
                            model,
                            url,
                            args.inputs / f"{model}.json",
                            batch[model],
                            c,
                            args.out / model,
                            window,
                            args.max_trials,
                            stability,
                        )
                        break
                    except PerfAnalyzerError as exc:
                        if attempt == args.retries:
                            failures.append(str(exc))
                            print(str(exc), file=sys.stderr)
                        else:
                            print(
                                f"perf_analyzer: {model} c={c} failed in {window} ms windows; retrying with {2 * window} ms",
                                file=sys.stderr,
                            )
                if found is None:
                    continue
                for r in found:
                    r["_window_ms"], r["_stability"] = window, stability
                parts.append(args.out / model / f"c{c}.csv")
                rows += [summarise(model, batch[model], r) for r in found]
            if parts:
                _merge_csv(parts, args.out / f"{model}.csv")
        info = conditions(pa, server, url, args, meta)
    finally:
        if server is not None:
            server.stop()
    table = format_table(rows)
    print(table)
    print("\n" + json.dumps(info, indent=2))
    (args.out / "summary.md").write_text(
        "# perf_analyzer sweep\n\n" + table + "\n\nConditions:\n\n```json\n" + json.dumps(info, indent=2) + "\n```\n"
    )
    (args.out / "summary.json").write_text(json.dumps({"conditions": info, "rows": rows, "failures": failures}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
