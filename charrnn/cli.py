"""The `charrnn` command: one parser builder and one handler per subcommand, each a thin call into the modules.

Handlers return exit codes: 0 ok, 1 runtime failure, 2 usage or config error. A `CharrnnError` becomes one line on
stderr; any other exception too, unless `--debug` asks for the traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import CharrnnError, UsageError


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model on a text",
                       description="Train a character model. Example: charrnn train --config configs/andersen.yaml "
                                   "--set train.max_minutes=10")
    p.add_argument("--config", help="YAML config file (see configs/); optional with --resume")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=1e-3 (repeatable)")
    p.add_argument("--run-dir", help="where checkpoints and metrics go (default: checkpoints/<config file stem>/)")
    p.add_argument("--device", choices=None, help="auto | cpu | cuda | mps (overrides train.device)")
    p.add_argument("--resume", metavar="CKPT|auto",
                   help="continue a run from a checkpoint; 'auto' uses the run directory's last.pt if there is one")
    p.add_argument("--overwrite", action="store_true", help="start a new run in a directory that holds one")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from . import checkpoint
    from .config import load_config
    from .train import Trainer

    overrides = list(args.overrides) + ([f"train.device={args.device}"] if args.device else [])
    if not args.config and not args.resume:
        raise UsageError("charrnn train needs --config PATH (e.g. --config configs/andersen.yaml) or --resume CKPT")
    run_dir = Path(args.run_dir) if args.run_dir else None
    ckpt = None
    if args.resume == "auto":
        if run_dir is None:
            if not args.config:
                raise UsageError("--resume auto needs --config or --run-dir to find the run directory")
            run_dir = Path("checkpoints") / Path(args.config).stem
        if (run_dir / "last.pt").exists():
            ckpt = checkpoint.load(run_dir / "last.pt")
    elif args.resume:
        ckpt = checkpoint.load(args.resume)
        run_dir = run_dir or Path(args.resume).parent
    if run_dir is None:
        run_dir = Path("checkpoints") / Path(args.config).stem
    cfg = load_config(args.config, overrides, base=ckpt["config"] if ckpt else None)
    trainer = Trainer(cfg, run_dir, resume=ckpt, overwrite=args.overwrite, progress=not args.no_progress)
    print("resolved config:\n" + cfg.to_yaml(), file=sys.stderr)
    trainer.fit()
    return 0


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a checkpoint",
                       description="Generate text; unset options take the run's `sample` config. Example: "
                                   "charrnn sample --checkpoint checkpoints/andersen/best.pt --temperature 0.5 "
                                   "--top-k 5 --prime 'The '")
    p.add_argument("--checkpoint", required=True, help="a .pt file written by charrnn train")
    p.add_argument("--prime", help="text that starts every sample (default: a newline)")
    p.add_argument("--length", type=int, help="characters to generate (default 500)")
    p.add_argument("--temperature", type=float, help="softmax temperature; 0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely characters (default 0: all)")
    p.add_argument("--seed", type=int, help="random seed: the same seed gives the same text")
    p.add_argument("--num-samples", type=int, help="samples generated together as one batch (default 1)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
    from .sample import Sampler

    sampler = Sampler.from_checkpoint(args.checkpoint, args.device)
    prime = args.prime or sampler.default_prime()
    n = args.num_samples if args.num_samples is not None else sampler.settings.num_samples
    out = sys.stdout

    def stream(text: str) -> None:
        out.write(text)
        out.flush()

    texts = sampler.generate(prime, args.length, args.temperature, args.top_k, n, args.seed,
                             stream=stream if n == 1 else None)
    if n == 1:
        out.write("\n")
    else:
        for i, text in enumerate(texts, 1):
            out.write(f"=== sample {i} ===\n{prime}{text}\n")
    return 0


def _add_download(sub) -> None:
    p = sub.add_parser("download", help="download a Project Gutenberg book into data/",
                       description="Download books from Project Gutenberg (via a mirror), strip the header and "
                                   "licence, and write data/<name>.txt. Example: charrnn download --gutenberg andersen")
    p.add_argument("--gutenberg", nargs="*", metavar="BOOK", default=None,
                   help="book numbers or aliases (default: andersen); see --list")
    p.add_argument("--out", default="data", help="output directory (default data/)")
    p.add_argument("--mirror", help="a Gutenberg mirror base URL (or env CHARRNN_GUTENBERG_MIRROR)")
    p.add_argument("--force", action="store_true", help="download again even if the file exists")
    p.add_argument("--ascii", action="store_true", help="transliterate the text to ASCII with unidecode")
    p.add_argument("--max-mb", type=float, default=64, help="refuse downloads larger than this (default 64 MB)")
    p.add_argument("--list", action="store_true", help="list the book aliases and exit")
    p.set_defaults(func=cmd_download)


def cmd_download(args) -> int:
    from . import download

    if args.list:
        print(download.format_book_list())
        return 0
    if args.gutenberg is None:
        raise UsageError("say where to download from: charrnn download --gutenberg [BOOK ...] (see --list)")
    download.download_books(args.gutenberg, out_dir=args.out, mirror=args.mirror, force=args.force,
                            ascii=args.ascii, max_mb=args.max_mb)
    return 0


def _add_bench(sub) -> None:
    from .bench import add_arguments

    p = sub.add_parser("bench", help="measure training, sampling and encoding speed on this machine",
                       description="The speed benchmark (also scripts/bench.py). Example: charrnn bench --write")
    add_arguments(p)
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from .bench import run_from_args

    return run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="charrnn", description="Character-level LSTM language models: "
                                     "download a book, train, sample.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_download, _add_train, _add_sample, _add_bench):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CharrnnError as e:
        if args.debug:
            raise
        print(f"charrnn: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("charrnn: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure still gets one line; --debug shows where
        if args.debug:
            raise
        print(f"charrnn: error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return 1
