"""Layer-level diagnosis of Compound BN on a trained run: what the mixture does to class information.

For every norm layer of each given run (BN or CBN, in network order) this measures, on the test set:

- **class separation in and out of the layer**: the Fisher ratio of the per-image channel means,
  F(z) = mean_c [ Var_y(E[z_c | y]) / Var(z_c) ] (between-class over total variance, classes weighted
  equally).  BN in eval is one affine map per channel, so F(out) / F(in) = 1 exactly for BN: the row
  is the check of the measurement.  For CBN the ratio says whether the per-position mixture of
  affine maps keeps (1), sharpens (> 1) or erases (< 1) what the layer's input knew about the class;
- **channels with weight exactly 0** (in every component): a channel the network cannot use; protocol v2's
  zero-initialised option-A ResNets left 16 and 48 such channels in each block of stages 2 and 3;
- **the mixture** (CBN only): running priors pi_k, the mean responsibility of each component per
  class (test images), the normalised mutual information I(k; y) / H(k) of component and class (0: the
  components ignore the class, 1: each class has its own), and the mean posterior entropy / log M
  (0: hard assignments, 1: uniform);
- **what the components follow instead** (CBN only): the same normalised mutual information of the
  component with *object vs background* at each position, I(k; f) / H(k).  A pixel is object when it
  is above a tenth of the image's range over its minimum (Fashion-MNIST's background is black; the
  tenth keeps the resize's blur out), and f = 1 where at least half of the pixels under a position
  (the mask area-pooled to the layer's map) are object; positions are weighted by their frequency.

    python benchmarks/cbn_layer_diagnosis.py runs/bench/bs_aa/seed0 runs/bench/bs_aa_cbn/seed0 \\
        --out benchmarks/results/cbn_layer_diagnosis

Each run directory is one written by train/train.py (config.yaml + model.safetensors).  Writes
``<out>.json``, ``<out>.md`` and ``<out>.png`` (needs matplotlib for the plot).
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_run(run_dir: Path):
    """(model in eval mode, test loader, class names) of a finished run directory."""
    import timm
    import lt_zoo  # noqa: F401  (registers the entrypoints)
    from lt_zoo import data as ltdata
    from lt_zoo.training.config import load_config, sections
    from lt_zoo.training.data import build_data, build_loaders

    for name in ('config.yaml', 'config.json', 'model.safetensors'):
        if not (run_dir / name).is_file():
            raise SystemExit(f'error: {run_dir} has no {name}; expected a finished train/train.py run directory')
    c = sections(load_config(['--config', str(run_dir / 'config.yaml')]))
    meta = json.loads((run_dir / 'config.json').read_text())
    model = timm.create_model(f'local-dir:{run_dir}', pretrained=True)  # the run's own mean/std and options
    data = build_data(c.data)
    mean, std = ltdata.mean_std_from_timm(model, data['in_chans'])
    _, test_dl = build_loaders(c.data, data, mean, std, batch_size=512, two_view=False, sampler=None)
    return model.eval(), test_dl, meta.get('label_names')


def fisher_ratio(z: torch.Tensor, y: torch.Tensor, num_classes: int) -> float:
    """mean_c Var_y(E[z_c|y]) / Var(z_c) with classes weighted equally; z (N, C) float64."""
    means = torch.stack([z[y == k].mean(0) for k in range(num_classes)])  # (K, C)
    within = torch.stack([z[y == k].var(0, unbiased=False) for k in range(num_classes)]).mean(0)
    between = means.var(0, unbiased=False)
    return float((between / (between + within).clamp_min(1e-30)).mean())


@torch.no_grad()
def diagnose(run_dir: Path) -> dict:
    from lt_zoo.layers import CompoundBatchNorm2d
    from lt_zoo.layers.compound_bn_functional import responsibilities

    model, test_dl, _ = load_run(run_dir)
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, (torch.nn.BatchNorm2d, CompoundBatchNorm2d))]
    acc = {n: dict(zin=[], zout=[], r=[], ent=[], fg=None) for n, _ in layers}
    batch = {}  # the images of the current batch, for the object mask

    def hook(name, module):
        def fn(mod, inputs, output):
            x = inputs[0]
            acc[name]['zin'].append(x.double().mean((2, 3)))
            acc[name]['zout'].append(output.double().mean((2, 3)))
            if isinstance(mod, CompoundBatchNorm2d):
                t = mod.temperature if isinstance(mod.temperature, float) else float(mod.num_features)
                r = responsibilities(x.float(), mod.running_prior, mod.running_mean, mod.running_var, mod.eps, t)
                acc[name]['r'].append(r.double().mean((2, 3)))  # (N, M) per image
                ent = -(r.clamp_min(1e-30).log() * r).sum(1)  # (N, H, W)
                acc[name]['ent'].append(ent.double().mean((1, 2)) / math.log(max(r.shape[1], 2)))
                f = (torch.nn.functional.adaptive_avg_pool2d(batch['object'], r.shape[2:]) >= 0.5).double()
                rd = r.double()
                sums = torch.stack([(rd * f).sum((0, 2, 3)), (rd * (1 - f)).sum((0, 2, 3))])  # (2, M)
                acc[name]['fg'] = sums if acc[name]['fg'] is None else acc[name]['fg'] + sums
        return fn

    handles = [m.register_forward_hook(hook(n, m)) for n, m in layers]
    ys, correct = [], 0
    for x, y in test_dl:
        lo, hi = x.amin((1, 2, 3), keepdim=True), x.amax((1, 2, 3), keepdim=True)
        batch['object'] = (x > lo + 0.1 * (hi - lo)).float().amax(1, keepdim=True)
        logits = model(x)
        ys.append(y)
        correct += int((logits.argmax(1) == y).sum())
    for h in handles:
        h.remove()
    y = torch.cat(ys)
    k = int(y.max()) + 1
    rows = []
    for name, m in layers:
        a = acc[name]
        zin, zout = torch.cat(a['zin']), torch.cat(a['zout'])
        f_in, f_out = fisher_ratio(zin, y, k), fisher_ratio(zout, y, k)
        w = m.weight.detach().reshape(-1, m.weight.shape[-1])  # (M or 1, C)
        row = dict(layer=name, kind=type(m).__name__, fisher_in=f_in, fisher_out=f_out, ratio=f_out / f_in,
                   zero_weight_channels=int((w == 0).all(0).sum()), channels=int(w.shape[1]))
        if a['r']:
            r = torch.cat(a['r'])  # (N, M)
            usage = torch.stack([r[y == c].mean(0) for c in range(k)])  # (K, M) p(k | y)
            pk = usage.mean(0)
            h_k = float(-(pk * pk.clamp_min(1e-30).log()).sum())
            h_k_given_y = float(-(usage * usage.clamp_min(1e-30).log()).sum(1).mean())
            row.update(prior=[float(p) for p in m.running_prior],
                       usage_per_class=[[round(float(v), 4) for v in u] for u in usage],
                       nmi=(h_k - h_k_given_y) / h_k if h_k > 1e-12 else 0.0,
                       nmi_object=nmi_binary(a['fg']),
                       object_fraction=float(a['fg'][0].sum() / a['fg'].sum()),
                       entropy=float(torch.cat(a['ent']).mean()),
                       temperature=m.temperature)
        rows.append(row)
    return dict(run=str(run_dir), arch=type(model).__name__, test_top1=correct / len(y), layers=rows)


def nmi_binary(sums: torch.Tensor) -> float:
    """I(k; f) / H(k) from sums (2, M): row f of summed posteriors over the positions with f = 1, 0."""
    joint = sums / sums.sum()  # p(f, k)
    pk, pf = joint.sum(0), joint.sum(1, keepdim=True)
    h = lambda p: float(-(p * p.clamp_min(1e-300).log()).sum())
    h_k = h(pk)
    return (h_k - (h(joint) - h(pf))) / h_k if h_k > 1e-12 else 0.0


def write(results, out: Path, command: str) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.json').write_text(json.dumps(dict(command=command, runs=results), indent=1))
    lines = ['# CBN layer diagnosis', '', f'Produced by `{command}`.', '',
             'F = Fisher ratio of the per-image channel means (between-class / total variance, mean over '
             'channels); ratio = F(out) / F(in), exactly 1 for BN (one affine map per channel). NMI = I(component; '
             'class) / H(component) on the test set; entropy = mean posterior entropy / log M.', '']
    lines += ['NMI object = I(component; object or background at the position) / H(component): what the '
              'components follow instead of the class.', '']
    lines += ['| run | test top-1 | norm layers | mean ratio | min ratio | mean NMI | mean NMI object | mean entropy '
              '| components with prior < 0.01 |',
              '|---|---|---|---|---|---|---|---|---|']
    for res in results:
        ls = res['layers']
        mix = [r for r in ls if 'prior' in r]
        mean = lambda xs: sum(xs) / len(xs)
        lines.append(f"| `{res['run']}` | {100 * res['test_top1']:.2f} | {len(ls)} | {mean([r['ratio'] for r in ls]):.3f} | "
                     f"{min(r['ratio'] for r in ls):.3f} | "
                     + (f"{mean([r['nmi'] for r in mix]):.3f} | {mean([r['nmi_object'] for r in mix]):.3f} | "
                        f"{mean([r['entropy'] for r in mix]):.3f} | "
                        f"{sum(p < 0.01 for r in mix for p in r['prior'])}/{sum(len(r['prior']) for r in mix)} |"
                        if mix else '- | - | - | - |'))
    lines.append('')
    for res in results:
        lines += [f"## `{res['run']}` (test top-1 {100 * res['test_top1']:.2f})", '',
                  '| layer | kind | zero-weight channels | F(in) | F(out) | ratio | min prior | NMI | NMI object '
                  '| entropy |',
                  '|---|---|---|---|---|---|---|---|---|---|']
        for r in res['layers']:
            mix = (f"{min(r['prior']):.3f} | {r['nmi']:.3f} | {r['nmi_object']:.3f} | {r['entropy']:.3f}"
                   if 'prior' in r else '- | - | - | -')
            lines.append(f"| {r['layer']} | {r['kind']} | {r['zero_weight_channels']}/{r['channels']} | "
                         f"{r['fisher_in']:.3f} | {r['fisher_out']:.3f} | {r['ratio']:.3f} | {mix} |")
        lines.append('')
    out.with_suffix('.md').write_text('\n'.join(lines))
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for res in results:
        label = Path(res['run']).parent.name + '/' + Path(res['run']).name
        axes[0].plot([r['ratio'] for r in res['layers']], marker='o', ms=3, label=label)
        if 'nmi' in res['layers'][0]:
            axes[1].plot([r['nmi'] for r in res['layers']], marker='o', ms=3, label=label + ' NMI')
            axes[1].plot([r['entropy'] for r in res['layers']], ls='--', label=label + ' entropy')
            axes[1].plot([r['nmi_object'] for r in res['layers']], ls=':', label=label + ' NMI object')
    axes[0].axhline(1.0, color='k', lw=0.6)
    axes[0].set(xlabel='norm layer (network order)', ylabel='F(out) / F(in)', title='class separation kept by the norm')
    axes[1].set(xlabel='norm layer (network order)', ylim=(0, 1), title='CBN components vs class and object')
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix('.png'), dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('runs', nargs='+', type=Path, help='finished run directories (BN and/or CBN)')
    ap.add_argument('--out', type=Path, default=ROOT / 'benchmarks/results/cbn_layer_diagnosis',
                    help='output path without suffix')
    ap.add_argument('--threads', type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [diagnose(r) for r in args.runs]
    command = 'python benchmarks/cbn_layer_diagnosis.py ' + ' '.join(sys.argv[1:] if argv is None else argv)
    write(results, args.out, command)
    print(args.out.with_suffix('.md').read_text())


if __name__ == '__main__':
    main()
