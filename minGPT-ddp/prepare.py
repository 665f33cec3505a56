"""Download tiny shakespeare (1.1 MB of Shakespeare's plays, Karpathy's char-rnn data set)
to minGPT-ddp/data/tinyshakespeare.txt, where shakespeare_cpu_cfg.yaml looks for it.

usage: python minGPT-ddp/prepare.py [--out FILE] [--url URL]

Training needs no download: without data.path, main.py uses Python's standard library
sources. Offline? Copy any copy of the file to --out by hand, or train on data.path=FILE.
"""
import argparse
import os
import urllib.error
import urllib.request
from pathlib import Path

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DEFAULT_OUT = Path(__file__).resolve().parent / "data" / "tinyshakespeare.txt"
EXPECTED_CHARS = 1_115_394


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write it (default: %(default)s)")
    parser.add_argument("--url", default=URL, help="where to get it (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the server")
    args = parser.parse_args()
    if args.out.exists():
        print(f"{args.out} is already there ({args.out.stat().st_size:,} bytes)")
        return
    try:
        with urllib.request.urlopen(args.url, timeout=args.timeout) as response:
            text = response.read().decode("utf-8")
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise SystemExit(f"error: cannot download {args.url} ({reason}); offline? copy the file to {args.out} "
                         "by hand, or train on any text with data.path=FILE (or on the default corpus)") from None
    if args.url == URL and len(text) != EXPECTED_CHARS:
        raise SystemExit(f"error: expected {EXPECTED_CHARS:,} characters from {args.url}, got {len(text):,}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".part")  # a broken download never looks finished
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, args.out)
    print(f"wrote {args.out} ({len(text):,} characters)")


if __name__ == "__main__":
    main()
