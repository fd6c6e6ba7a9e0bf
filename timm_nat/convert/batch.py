"""``--all``: every registry entry converted and verified, or checked offline, with a report.

An entry whose downloads all fail is still checked: the architecture is built, its parameter
count compared with the published one, and one forward pass with random weights run at the
entry's real input size (detection / segmentation backbones: their exact backbone parameter count,
and the forward at ``BACKBONE_CHECK_SIZE``, see there). ``OUTPUT_DIR/report.md`` and ``OUTPUT_DIR/report.json`` record every
entry, what was verified, what could not be downloaded and why, and the exact commands that
finish the job with network or with the files at hand.
"""
import dataclasses
import fnmatch
import json
import shlex
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..pretrained import load_downstream_registry, load_registry, registry_entry_name
from .conversion import convert, model_outputs, uninitialized_model
from .errors import ConversionError, DownloadError, log, one_line
from .output import PROG, check_output
from .sources import Downloader, TRANSFORMERS_WEIGHTS, resolve_source, url_basename

__all__ = ['ALL_VERIFY_SIZE', 'EntryReport', 'convert_all']

ALL_VERIFY_SIZE = 64  # verification input of --all: 25 models, some 200M parameters, on a CPU
REPORT_MD, REPORT_JSON = 'report.md', 'report.json'
_REPORT_TITLE = f'# {PROG} --all report'
# Published parameter counts are whole millions, to 2-3 significant figures and not always rounded
# (200M for 200.9M and 201.1M, 86M for 86.6M, 28M for 28.3M): allow 1M or 1%, whichever is larger.
PARAMS_TOL_M, PARAMS_RTOL = 1.0, 0.01
# Forward check of the 45 detection / segmentation backbones: None runs each at its task's test size
# (as the classifiers run at theirs); tests set a reduced size such as (3, 192, 256), at which every
# entry's attention pads maps smaller than kernel x dilation (the path task sizes take too), and the
# report then says the size was reduced.
BACKBONE_CHECK_SIZE: Optional[Tuple[int, int, int]] = None


@dataclasses.dataclass
class EntryReport:
    """What ``--all`` did with one registry entry (a row of report.md, an item of report.json)."""
    entry: str
    sources: List[str]  # the registry's published locations, in the order tried
    status: str = 'FAILED'  # converted | offline-checked | FAILED
    problem: bool = True
    output: Optional[str] = None  # the folder written
    params: str = '-'  # parameter count against the published one, for people
    verified: Dict[str, Any] = dataclasses.field(default_factory=dict)  # converted: diffs, sha256, provenance
    checks: Dict[str, Any] = dataclasses.field(default_factory=dict)  # offline: built, params, forward
    download_errors: List[Dict[str, str]] = dataclasses.field(default_factory=list)
    error: Optional[str] = None
    commands: Dict[str, str] = dataclasses.field(default_factory=dict)  # to finish: 'network' / 'file'

    @property
    def source(self) -> str:
        """The source shown in the summary: a Hub repo id as is, a URL by its file name."""
        spec = self.verified.get('source') or self.sources[0]
        shown = url_basename(spec) if spec.startswith(('http://', 'https://')) else spec
        return shown + (' (not downloaded)' if self.status == 'offline-checked' else '')


def _params_check(num_params: int, num_classes: int, entry: Dict[str, Any]) -> Tuple[str, bool]:
    """Parameter count against the published one (see PARAMS_TOL_M; a backbone's computed count exactly)
    and classes against the registry."""
    ok, text = True, f"{num_params / 1e6:.2f}M"
    if 'backbone_params' in entry:
        matches = num_params == entry['backbone_params']
        ok &= matches
        text = f"{num_params:,} {'==' if matches else '!='} {entry['backbone_params']:,} backbone (computed)"
    elif 'params_m' in entry:
        matches = abs(num_params / 1e6 - entry['params_m']) <= max(PARAMS_TOL_M, PARAMS_RTOL * entry['params_m'])
        ok &= matches
        text += f" {'~' if matches else '!='} {entry['params_m']:g}M published"
    else:
        text += ' (none published)'
    if num_classes != entry.get('num_classes', 0):
        ok, text = False, text + f", {num_classes} classes != registry {entry['num_classes']}"
    return ('yes ' if ok else 'NO ') + text, ok


def _random_model(name: str, num_classes: int) -> torch.nn.Module:
    """The architecture with random N(0, 0.02) weights (a smoke test needs no good init)."""
    model = uninitialized_model(name, num_classes=num_classes)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02, generator=generator)
    return model.eval()


def _offline_check(entry: Dict[str, Any], report: EntryReport) -> bool:
    """What can be checked without the weights: build, parameter count, classes, one random forward
    at the entry's input size."""
    backbone = 'task' in entry
    model = _random_model(registry_entry_name(entry), entry.get('num_classes', 0))
    num_classes = model.pretrained_cfg['num_classes']  # what timm will load for this tag
    num_params = sum(p.numel() for p in model.parameters())
    report.params, params_ok = _params_check(num_params, num_classes, entry)
    task_size = tuple(entry['eval_input_size'] if backbone else entry['input_size'])
    input_size = (BACKBONE_CHECK_SIZE or task_size) if backbone else task_size
    inputs = torch.randn(1, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # not inference_mode: cached attention plans must stay usable for training
        outputs = model_outputs(model, inputs)
    if backbone:  # four maps, strides 4 to 32, the stage widths
        expected = [(1, info['num_chs'], -(-input_size[1] // info['reduction']), -(-input_size[2] // info['reduction']))
                    for info in model.feature_info]
    else:
        expected = [(1, entry['num_classes'])]
    finite = all(bool(torch.isfinite(o).all()) for o in outputs)
    forward_ok = [tuple(o.shape) for o in outputs] == expected and finite
    shapes = [list(o.shape) for o in outputs]
    report.checks = dict(
        built=True, num_params=num_params, params_published_m=entry.get('params_m'), params_ok=params_ok,
        num_classes=num_classes, forward=dict(input_size=[1, *input_size], output_shape=shapes if backbone else shapes[0],
                                              finite=finite, ok=forward_ok))
    shape = 'x'.join(map(str, (1, *input_size)))
    shown = ', '.join(str(tuple(s)) for s in shapes)
    reduced = f" (reduced from the task's {'x'.join(map(str, task_size))})" if input_size != task_size else ''
    report.checks['summary'] = f"forward {shape}{reduced} -> {shown} {'ok' if forward_ok else 'WRONG'}"
    return params_ok and forward_ok


def _finish_commands(entry: Dict[str, Any], target: Path, output_dir: Path, command: str) -> Dict[str, str]:
    """The commands that convert ``entry`` later (``command`` runs the converter): online, or from the
    published file at hand."""
    out = shlex.quote(str(target))
    network = f"{command} --all --output-dir {shlex.quote(str(output_dir))} --only {registry_entry_name(entry)}"
    if 'url' in entry:
        file = f"{command} /path/to/{url_basename(entry['url'])} -o {out}"
    else:  # a transformers folder: config.json + the weights, e.g. from `hf download`
        file = (f"{command} /path/to/{entry['hf_hub_id'].split('/')[1]} -o {out}  # a folder with config.json and "
                f"{entry.get('hf_hub_filename', TRANSFORMERS_WEIGHTS[0])} (hf download {entry['hf_hub_id']})")
    return dict(network=network, file=file)


def _convert_entry(entry, output_dir: Path, force: bool, size: int, downloader: Downloader, log) -> EntryReport:
    name = registry_entry_name(entry)
    target = output_dir / name
    report = EntryReport(name, [entry[k] for k in ('hf_hub_id', 'url') if k in entry])
    try:
        check_output(target, force)
    except ConversionError as err:
        report.error = one_line(err)
        log(f"  FAILED: {err}")
        return report
    for spec in report.sources:
        try:
            source = resolve_source(spec, downloader)
        except DownloadError as err:
            report.download_errors.append(dict(source=spec, reason=one_line(err)))
            log(f"  {err}")
            continue
        try:
            conversion = convert(source, target, force=force, verify_size=size, log=lambda m: log(f"  {m}"))
        except ConversionError as err:
            report.error = one_line(err)
            log(f"  FAILED: {report.error}")
            return report
        report.params, ok = _params_check(conversion.num_params, conversion.architecture.num_classes, entry)
        log(f"  params: {report.params}")
        prov = conversion.provenance
        report.status, report.problem, report.output = 'converted', not ok, str(target)
        report.verified = dict(source=spec, verify_size=size, max_abs_diff=conversion.max_abs_diff,
                               sha256=prov.sha256, size=prov.size, provenance=prov.note,
                               published_numbers_claimed=prov.published is not None)
        return report
    ok = _offline_check(entry, report)
    log(f"  offline checks: params {report.params}; {report.checks['summary']}")
    report.status, report.problem = ('offline-checked' if ok else 'FAILED'), not ok
    return report


def _summary(rows: List[EntryReport]) -> str:
    table = [('entry', 'source', 'status', 'params ok', 'max diff')] + [
        (r.entry, r.source, r.status, r.params,
         f"{max(r.verified['max_abs_diff'].values()):g}" if r.verified else '-') for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    return '\n'.join('  '.join(c.ljust(w) for c, w in zip(row, widths)) + '  ' + row[4] for row in table)


def _check_report_files(output_dir: Path) -> None:
    """Refuse to overwrite report files that an earlier ``--all`` did not write."""
    md, js = output_dir / REPORT_MD, output_dir / REPORT_JSON
    if md.exists() and not md.read_text(errors='replace').startswith(_REPORT_TITLE):
        raise ConversionError(f"{md} exists and was not written by {PROG} --all; not overwriting it")
    if js.exists():
        try:
            ours = json.loads(js.read_text()).get('written_by') == PROG
        except (ValueError, AttributeError, OSError):
            ours = False
        if not ours:
            raise ConversionError(f"{js} exists and was not written by {PROG} --all; not overwriting it")


def _network_command(command: str, output_dir: Path, rows: List[EntryReport], only: Optional[Sequence[str]]) -> str:
    """The command that finishes the unfinished entries with network: this run's selection again when
    none was finished (``--all`` alone for a whole registry), else only the unfinished ones."""
    unfinished = [r.entry for r in rows if r.commands]
    if len(unfinished) == len(rows):
        selection = ['--only', *only] if only else []
    else:
        selection = ['--only', *unfinished]
    return ' '.join([command] + [shlex.quote(a) for a in ('--all', '--output-dir', str(output_dir), *selection)])


def _report_markdown(
        rows: List[EntryReport], totals: Dict[str, int], offline: Optional[str], network_command: str) -> str:
    lines = [_REPORT_TITLE, '', f"{totals['entries']} entries: {totals['converted']} converted and verified, "
             f"{totals['offline_checked']} checked offline only (downloads failed), {totals['wrong']} wrong.", '']
    if offline:
        lines += [f"Network: {offline}; no download was attempted.", '']
    lines += [
        '- **converted**: downloaded from the published source, converted, and the folder loaded back through '
        "timm's public paths reproduces the source exactly (max abs diff 0.0); parameters vs published.",
        '- **offline-checked**: not downloaded; the architecture was built with random weights, its parameter '
        'count compared with the published one, and one forward run at its real input size.', '',
        '| entry | status | source | params | verified |', '|---|---|---|---|---|']
    for r in rows:
        detail = (f"max abs diff {max(r.verified['max_abs_diff'].values()):g}; {r.verified['provenance']}"
                  if r.verified else r.checks.get('summary', r.error or '-'))
        lines.append(f"| `{r.entry}` | {r.status} | {r.source} | {r.params} | {detail} |")
    failed = [r for r in rows if r.download_errors]
    if failed:
        lines += ['', '## Not downloaded', '']
        lines += [f"- `{r.entry}`: " + '; '.join(e['reason'] for e in r.download_errors) for r in failed]
    unfinished = [r for r in rows if r.commands]
    if unfinished:
        lines += ['', '## To finish the job', '', 'With network (downloads, then converts and verifies):', '',
                  '```', network_command, '```', '',
                  'With the published files at hand (one command each; the model card then quotes no '
                  'published numbers, since nothing proves the file is the published one):', '', '```']
        lines += [r.commands['file'] for r in unfinished] + ['```']
    errors = [r for r in rows if r.error]
    if errors:
        lines += ['', '## Failures', ''] + [f"- `{r.entry}`: {r.error}" for r in errors]
    return '\n'.join(lines) + '\n'


def _write_reports(output_dir: Path, rows: List[EntryReport], totals: Dict[str, int], offline: Optional[str],
                   network_command: str) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    payload = dict(written_by=PROG, totals=totals, offline=offline,
                   finish_with_network=network_command if any(r.commands for r in rows) else None,
                   entries=[dict(dataclasses.asdict(r), source_shown=r.source) for r in rows])
    for name, text in ((REPORT_JSON, json.dumps(payload, indent=2) + '\n'),
                       (REPORT_MD, _report_markdown(rows, totals, offline, network_command))):
        partial = output_dir / f'.{name}.partial'
        partial.write_text(text)
        partial.replace(output_dir / name)


def convert_all(
        output_dir: Path,
        only: Optional[Sequence[str]] = None,
        force: bool = False,
        verify_size: int = ALL_VERIFY_SIZE,
        log: Callable[[str], None] = log,
        command: str = PROG,
) -> int:
    """Convert and verify every registry entry into ``output_dir/<model>.<tag>/``, with a report.

    Entries whose downloads fail are still checked offline (build, parameter count, classes, one
    forward with random weights at the entry's input size). Writes ``output_dir/report.md`` and
    ``report.json``, whose commands to finish the job start with ``command`` (how to run the converter,
    see :func:`.output.rerun_command`). Returns 0 if every entry was converted and verified, 3 if
    some could only be checked offline, 1 if anything was wrong.
    """
    output_dir = Path(output_dir)
    entries = [e for e in load_registry() + load_downstream_registry()
               if not only or any(fnmatch.fnmatch(registry_entry_name(e), p) for p in only)]
    if not entries:
        raise ConversionError(f"--only {' '.join(only)} matches no registry entry")
    _check_report_files(output_dir)
    downloader, rows = Downloader(log), []
    for i, entry in enumerate(entries, 1):
        log(f"[{i}/{len(entries)}] {registry_entry_name(entry)}")
        report = _convert_entry(entry, output_dir, force, verify_size, downloader, log)
        if report.checks:  # checked offline: not downloaded, so say how to finish it
            report.commands = _finish_commands(entry, output_dir / report.entry, output_dir, command)
        rows.append(report)
    totals = dict(entries=len(rows), converted=sum(r.status == 'converted' for r in rows),
                  offline_checked=sum(r.status == 'offline-checked' for r in rows), wrong=sum(r.problem for r in rows))
    network_command = _network_command(command, output_dir, rows, only)
    _write_reports(output_dir, rows, totals, downloader.known_offline, network_command)
    log('\n' + _summary(rows))
    log(f"\n{totals['entries']} entries: {totals['converted']} converted and verified, {totals['offline_checked']} "
        f"checked offline only (downloads failed), {totals['wrong']} wrong")
    log(f"report: {output_dir / REPORT_MD}, {output_dir / REPORT_JSON}")
    if totals['wrong']:
        return 1
    return 3 if totals['offline_checked'] else 0
