"""The `charrnn` command: one parser builder and one handler per subcommand, each a thin call into the modules.

Handlers return exit codes: 0 ok, 1 runtime failure, 2 usage or config error. A `CharrnnError` becomes one line on
stderr; any other exception too, unless `--debug` asks for the traceback.
"""

from __future__ import annotations

import argparse
import json
import math
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
    p.add_argument("--init-from", metavar="CKPT",
                   help="fine-tune: a new run that starts from a checkpoint's weights (new optimizer, step 0)")
    p.add_argument("--extend-vocab", action="store_true",
                   help="with --init-from: add the text's new characters to the vocabulary instead of refusing it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from . import checkpoint
    from .config import load_config
    from .train import Trainer

    overrides = list(args.overrides) + ([f"train.device={args.device}"] if args.device else [])
    if not args.config and not args.resume:
        raise UsageError("charrnn train needs --config PATH (e.g. --config configs/andersen.yaml) or --resume CKPT")
    if args.init_from and args.resume:
        raise UsageError("--resume continues a run and --init-from starts a new one from a checkpoint's weights: "
                         "pass one of them")
    if args.extend_vocab and not args.init_from:
        raise UsageError("--extend-vocab goes with --init-from CKPT (a resumed run keeps its vocabulary)")
    run_dir = Path(args.run_dir) if args.run_dir else None
    ckpt = None
    if args.resume == "auto":
        if run_dir is None:
            if not args.config:
                raise UsageError("--resume auto needs --config or --run-dir to find the run directory")
            run_dir = Path("checkpoints") / Path(args.config).stem
        if (run_dir / "last.pt").exists():
            ckpt = checkpoint.load(run_dir / "last.pt")
        elif not args.config:
            raise UsageError(f"--resume auto: {run_dir} holds no last.pt, and a new run needs --config")
    elif args.resume:
        ckpt = checkpoint.load(args.resume)
        if "optimizer" not in ckpt:
            raise UsageError(f"--resume {args.resume}: an exported file holds no training state to continue; resume "
                             f"from the run's last.pt, or fine-tune from it with --init-from")
        run_dir = run_dir or Path(args.resume).parent
    if run_dir is None:
        run_dir = Path("checkpoints") / Path(args.config).stem
    init = checkpoint.load(args.init_from) if args.init_from else None
    base = ckpt["config"] if ckpt else {"model": init["config"]["model"]} if init else None
    cfg = load_config(args.config, overrides, base=base)
    trainer = Trainer(cfg, run_dir, resume=ckpt, overwrite=args.overwrite, progress=not args.no_progress,
                      init_from=init, extend_vocab=args.extend_vocab)
    print("resolved config:\n" + cfg.to_yaml(), file=sys.stderr)
    trainer.fit()
    return trainer.exit_code


def _add_plot(sub) -> None:
    p = sub.add_parser("plot", help="plot a run's train and val loss to loss.png (needs matplotlib)",
                       description="Write <run dir>/loss.png: train and val loss against steps and against wall "
                                   "time. Needs matplotlib: pip install 'charrnn[plot]'. "
                                   "Example: charrnn plot checkpoints/andersen")
    p.add_argument("run_dir", help="a run directory written by charrnn train (holds metrics.jsonl)")
    p.set_defaults(func=cmd_plot)


def cmd_plot(args) -> int:
    from .plot import plot_run

    print(f"wrote {plot_run(args.run_dir)}")
    return 0


def _add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate text from a checkpoint",
                       description="Generate text; unset options take the run's `sample` config. Examples: "
                                   "charrnn sample --checkpoint checkpoints/andersen/best.pt --temperature 0.5 "
                                   "--top-k 5 --prime 'The ';  charrnn sample --checkpoint checkpoints/names/best.pt "
                                   "--lines 1000 --novel --unique")
    p.add_argument("--checkpoint", required=True,
                   help="a .pt file written by charrnn train, or a .safetensors file written by charrnn export")
    primes = p.add_mutually_exclusive_group()
    primes.add_argument("--prime", help="text that starts every sample, in the model's characters "
                                        "(default: the run's sample.prime)")
    primes.add_argument("--prime-file", metavar="FILE", help="read the prime from a UTF-8 file")
    p.add_argument("--length", type=int, help="characters to generate (default 500); with --lines, the longest item")
    p.add_argument("--temperature", metavar="T[,T...]",
                   help="softmax temperature, 0 is greedy (default 0.8); a list like 0.2,0.5,1.0 prints a sheet "
                        "with a sample per temperature")
    p.add_argument("--top-k", type=int, help="sample among the k most likely characters (default 0: all)")
    p.add_argument("--top-p", type=float, help="nucleus: sample among the likeliest characters that hold this much "
                                               "probability (default 1: all)")
    p.add_argument("--repetition-penalty", type=float,
                   help="> 1 shrinks the logits of the characters among the last 32 (default 1: off)")
    p.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="end a sample after the first STRING it generates, STRING included; backslash escapes "
                        "work, e.g. --stop '\\n\\n' (repeatable)")
    p.add_argument("--num-samples", type=int, help="samples generated together as one batch (default 1)")
    p.add_argument("--seed", type=int, help="random seed: the same seed gives the same text")
    p.add_argument("--beam", type=int, default=0, metavar="N",
                   help="beam search with N beams: the likeliest continuation instead of a sample")
    p.add_argument("--lines", type=int, metavar="N",
                   help="lines-mode checkpoints: N complete items (e.g. names), generated as one batch")
    p.add_argument("--novel", action="store_true", help="with --lines: keep only items not in the training text")
    p.add_argument("--unique", action="store_true", help="with --lines: drop repeated items")
    p.add_argument("--format", choices=["text", "jsonl"], default="text",
                   help="jsonl: one JSON object per sample with prime, text, settings and mean log-prob per char")
    p.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")
    p.add_argument("--force", action="store_true", help="let --output replace an existing file")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.set_defaults(func=cmd_sample)


def _unescape(value: str) -> str:
    r"""A --stop value with backslash escapes (\n, \t, \\, \u00e9) interpreted; other characters are kept."""
    try:
        return value.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise UsageError(f"--stop {value!r} has a bad backslash escape ({e.reason}); "
                         f"write a backslash as \\\\") from None


def _temperatures(value: str | None) -> list[float | None]:
    if value is None:
        return [None]
    try:
        return [float(t) for t in value.split(",")]
    except ValueError:
        raise UsageError(f"--temperature {value!r} must be a number or a comma list like 0.2,0.5,1.0") from None


def _read_prime(args) -> str | None:
    if args.prime_file is None:
        return args.prime
    try:
        prime = Path(args.prime_file).read_text(encoding="utf-8").removeprefix("\ufeff").replace("\r\n", "\n")
    except OSError as e:
        raise CharrnnError(f"--prime-file {args.prime_file} could not be read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UsageError(f"--prime-file {args.prime_file} is not UTF-8 text") from None
    if not prime:
        raise UsageError(f"--prime-file {args.prime_file} is empty")
    return prime


def _jsonl(sample) -> str:
    return json.dumps({"prime": sample.prime, "text": sample.text, "settings": sample.settings,
                       "mean_logprob": round(sample.mean_logprob, 5), "stopped": sample.stopped},
                      ensure_ascii=False) + "\n"


def cmd_sample(args) -> int:
    from .sample import Sampler

    prime = _read_prime(args)
    temps = _temperatures(args.temperature)
    stops = [_unescape(s) for s in args.stop]
    if (args.novel or args.unique) and args.lines is None:
        raise UsageError("--novel and --unique filter the items of --lines N: add --lines")
    if args.lines is not None:
        extra = [f for f, on in (("--num-samples", args.num_samples is not None), ("--beam", args.beam),
                                 ("--stop", stops), ("a temperature list", len(temps) > 1)) if on]
        if extra:
            raise UsageError(f"--lines N makes N items, each ending at the line boundary: drop {', '.join(extra)}")
    if args.output and Path(args.output).exists() and not args.force:
        raise UsageError(f"--output {args.output} already exists: pass --force to replace it")
    sampler = Sampler.from_checkpoint(args.checkpoint, args.device)
    if args.top_k is not None and args.top_k > len(sampler.vocab) and not args.beam:
        print(f"note: --top-k {args.top_k} is more than the model's {len(sampler.vocab)} characters: sampling among "
              f"all of them", file=sys.stderr)
    common = {"length": args.length, "top_k": args.top_k, "top_p": args.top_p,
              "repetition_penalty": args.repetition_penalty, "seed": args.seed}
    out = open(args.output, "w" if args.force else "x", encoding="utf-8") if args.output else sys.stdout
    try:
        if args.lines is not None:
            result = sampler.lines(args.lines, prime or "", temperature=temps[0], novel=args.novel,
                                   unique=args.unique, **common)
            for item in result.items:
                out.write(_jsonl(item) if args.format == "jsonl" else item.prime + item.text + "\n")
            print(result.summary(), file=sys.stderr)
            return 0
        n = args.num_samples if args.num_samples is not None else sampler.settings.num_samples
        streaming = args.format == "text" and out is sys.stdout and n == 1 and len(temps) == 1

        def stream(text: str) -> None:
            out.write(text)
            out.flush()

        for temp in temps:
            samples = sampler.samples(prime, temperature=temp, num_samples=args.num_samples, stop=stops,
                                      beam=args.beam, stream=stream if streaming else None, **common)
            for i, sample in enumerate(samples, 1):
                if args.format == "jsonl":
                    out.write(_jsonl(sample))
                elif streaming:
                    out.write("\n")
                elif len(samples) == len(temps) == 1:
                    out.write(sample.prime + sample.text + "\n")
                else:
                    label = ", ".join(([f"temperature {temp:g}"] if len(temps) > 1 else [])
                                      + ([f"sample {i}"] if len(samples) > 1 else []))
                    out.write(f"=== {label} ===\n{sample.prime}{sample.text}\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="score a text: loss in nats/char, bits/char and perplexity",
                       description="Score a whole text (or the run's validation split) with a checkpoint, batched "
                                   "and stateful like the trainer's evaluation. Example: charrnn eval --checkpoint "
                                   "checkpoints/andersen/best.pt --split val")
    p.add_argument("--checkpoint", required=True, help="a .pt file written by charrnn train")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", metavar="FILE", help="a text file, read the way the training text was")
    source.add_argument("--split", choices=["val"], help="the validation split of the run's training text")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    from . import checkpoint
    from .evaluate import evaluate_file, evaluate_split
    from .sample import Sampler
    from .vocab import show_chars

    if not args.text and not args.split:
        raise UsageError("charrnn eval needs --text FILE or --split val: what to score")
    ckpt = checkpoint.load(args.checkpoint)
    s = Sampler.from_dict(ckpt, args.device)
    progress = not args.no_progress
    if args.split:
        m = evaluate_split(s.model, s.vocab, s.config, s.device, progress)
        where = f"{s.config.data.path}, validation split"
    else:
        m = evaluate_file(s.model, s.vocab, args.text, s.config, s.device, progress)
        where = args.text
    print(f"{where}: {m['chars']:,} characters scored")
    print(f"loss {m['loss']:.4f} nats/char, {m['bpc']:.4f} bits/char, perplexity {m['perplexity']:.3f}")
    if m["oov"]:
        how = "scored as the unknown symbol" if s.vocab.unk else "skipped"
        print(f"{m['oov']:,} character(s) outside the vocabulary ({show_chars(list(m['oov_chars']))}) were {how}")
    recorded = (ckpt.get("metrics") or {}).get("val_loss")
    if args.split and recorded is not None and math.isfinite(recorded):
        print(f"the trainer's val loss for this checkpoint: {recorded:.4f} nats/char")
    return 0


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="describe a checkpoint",
                       description="Architecture, parameters, vocabulary, training config and progress, losses, "
                                   "torch version and device of a checkpoint. Example: charrnn info --checkpoint "
                                   "checkpoints/andersen/best.pt")
    p.add_argument("--checkpoint", required=True, help="a .pt file written by charrnn train")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from .info import describe, format_info

    d = describe(args.checkpoint)
    print(json.dumps(d, ensure_ascii=False, indent=1) if args.json else format_info(d))
    return 0


def _add_env(sub) -> None:
    p = sub.add_parser("env", help="show torch, CUDA, cuDNN, MPS and CPU threads",
                       description="What this machine offers charrnn. Example: charrnn env")
    p.set_defaults(func=cmd_env)


def cmd_env(args) -> int:
    from .info import environment, format_env

    print(format_env(environment()))
    return 0


EXPORT_SUFFIX = {"torchscript": ".ts", "safetensors": ".safetensors"}


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a checkpoint as a TorchScript sampler that needs only torch, or as "
                                      "safetensors",
                       description="Export a model for use without charrnn (torchscript) or without pickle "
                                   "(safetensors, needs pip install 'charrnn[safetensors]'). Example: charrnn export "
                                   "--checkpoint checkpoints/andersen/best.pt --format torchscript")
    p.add_argument("--checkpoint", required=True, help="a .pt file written by charrnn train")
    p.add_argument("--format", choices=sorted(EXPORT_SUFFIX), default="torchscript", help="the export format")
    p.add_argument("--output", metavar="FILE",
                   help="where to write it (default: the checkpoint's path with .ts or .safetensors)")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> int:
    from .export import export_safetensors, export_torchscript

    out = args.output or Path(args.checkpoint).with_suffix(EXPORT_SUFFIX[args.format])
    if args.format == "safetensors":
        path = export_safetensors(args.checkpoint, out, args.force)
        print(f"wrote {path}; sample from it with: charrnn sample --checkpoint {path}")
    else:
        path = export_torchscript(args.checkpoint, out, args.force)
        print(f"wrote {path}; load it with torch alone: torch.jit.load({str(path)!r})(\"The \", 200, 0.8, 0, 1)")
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
    for add in (_add_download, _add_train, _add_plot, _add_sample, _add_eval, _add_info, _add_env, _add_export,
                _add_bench):
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
