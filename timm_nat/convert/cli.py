"""The command line, ``timm-nat-convert``: one source, or ``--all`` registry entries."""
import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from .batch import ALL_VERIFY_SIZE, convert_all
from .conversion import DEFAULT_VERIFY_SIZE, convert, push_to_hub
from .errors import ConversionError, one_line
from .output import PROG, rerun_command

__all__ = ['main']


def _json_object(text: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"not JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description='Convert NAT/DiNAT/DiNAT_s/isotropic checkpoints (Hub repo id, transformers folder, original '
                    '.pth path or URL) into verified timm folders (model.safetensors, config.json, README.md).',
        epilog='Exit status: 0 converted and verified; 1 failure; 2 usage; 3 (--all) some entries only checked '
               'offline because their downloads failed.')
    parser.add_argument('source', nargs='?', help='Hub repo id, local folder, .pth/.bin/.safetensors file or URL')
    parser.add_argument('--all', action='store_true', help='convert every entry of weights/checkpoints.toml')
    parser.add_argument('-o', '--output-dir', type=Path, required=True,
                        help='output folder (with --all: parent of one <model>.<tag>/ folder per entry, '
                             'and of report.md / report.json)')
    parser.add_argument('--model', help='registered architecture (default: inferred from the checkpoint)')
    parser.add_argument('--model-args', type=_json_object, default=None, metavar='JSON',
                        help='architecture kwargs as a JSON object, e.g. \'{"dilations": [[1, 8], [1, 4]]}\'')
    parser.add_argument('--force', action='store_true',
                        help='overwrite existing output folders (only ones this tool wrote)')
    parser.add_argument('--push-to-hub', metavar='REPO_ID', help='upload the converted folder to this Hub repo')
    parser.add_argument('--private', action='store_true', default=None, help='create the Hub repo private')
    parser.add_argument('--only', nargs='+', metavar='PATTERN', help='with --all: entries matching these globs')
    parser.add_argument('--verify-size', type=int, default=None, metavar='PX',
                        help=f'input size of the verification (default {DEFAULT_VERIFY_SIZE}; --all '
                             f'{ALL_VERIFY_SIZE}); the offline check of --all runs at each model\'s input size')
    parser.add_argument('--debug', action='store_true', help='show the traceback of an unexpected error')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point (``timm-nat-convert``); returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.all == bool(args.source):
        parser.error('give either a SOURCE or --all')
    if args.all and (args.model or args.model_args or args.push_to_hub):
        parser.error('--model, --model-args and --push-to-hub convert one SOURCE; not with --all')
    if args.only and not args.all:
        parser.error('--only selects registry entries for --all')
    try:
        if args.all:
            return convert_all(args.output_dir, only=args.only, force=args.force,
                               verify_size=args.verify_size or ALL_VERIFY_SIZE, command=rerun_command())
        conversion = convert(
            args.source, args.output_dir, model=args.model, model_args=args.model_args, force=args.force,
            verify_size=args.verify_size or DEFAULT_VERIFY_SIZE, hub_repo_id=args.push_to_hub)
        if args.push_to_hub:
            push_to_hub(conversion.output_dir, args.push_to_hub, private=args.private)
        return 0
    except ConversionError as err:
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:  # a bug or an unforeseen failure: one line, the traceback on request
        if args.debug:
            traceback.print_exc()
        else:
            print(f"{PROG}: error: unexpected {type(err).__name__}: {one_line(err)} "
                  "(rerun with --debug for the traceback)", file=sys.stderr)
        return 1
