"""DFD-HR against the authors' released detector: the same weights, the same inputs, on this machine.

    python -m benchmarks.bench_release --release=/path/to/DFD-HR          # a checkout of the authors' repository
    python -m benchmarks.bench_release --release=... --batches=2 --timing=false   # the checks alone

The released detector (`training/detectors/dfd_hr_detector.py` and its `utils/`) is imported from
the user's checkout, never copied into this project; it needs `einops` and `transformers`. What it
takes from DeepfakeBench (a detector registry, a loss registry, a training-metrics function) is
supplied by the minimal harness below, and its CLIP download by a ViT-L/14 `CLIPModel` built offline
with random weights. Without a checkout the benchmark says so and exits.

Both detectors get the same weights: the release's adapters, judges, pooling and head are copied
into ours built with `--ablation=released` (its routing: layers 20-22 routed, 23 for every sample,
argsort ranks, one Gumbel draw, no gate noise), so they must agree. The checks, at the first batch
size, each printing both detectors' exit layer per view (the release's read by hooks on its routers):
  - eval logits in three cases: as built (with random CLIP weights every view leaves at layer 21);
    every view through layers 20-22; exits mixed within the batch. In each, a copied weight of a
    routed layer that ran is changed in ours, and the logits must then differ: the check can fail.
  - one training step: the same batch and the same Gumbel draws (draws_in_our_order), the exits, the
    cross-entropy and the gradient of every weight both train.
The multiply-adds each spent are estimate_flops at the exits that ran. The exit code is 1 if a check
fails. Then, per batch size: eval forward and one training step (forward, backward, Adam), release
seconds / ours, medians of `repeats` after a warm-up with the two in turn, and the largest |difference|
of the eval logits. `--malloc` sets glibc's allocator for the process, so for both (speed.py; train.py
keeps freed memory).
"""
import copy
import importlib
import importlib.util
import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import cli
import speed
from benchmarks.measure import breakdown, table, timed
from dfdhr import DFDHR, dfdhr_loss, estimate_flops, make_config
from vit import load_clip


@dataclass(frozen=True)
class Options:
    release: str = ""          # the authors' repository (the folder holding training/detectors/)
    batches: str = "2,8"
    repeats: int = 2           # timed runs of each measurement, after one warm-up
    train: bool = True         # with --timing: also time a training step
    profile: bool = False      # with --train: also profile one training step of each, self CPU time by kind of operator
    malloc: str = "kept"       # "kept": freed memory kept for reuse in this process (speed.py), or glibc's "default"
    seed: int = 0
    checks: bool = True        # the three routing cases and the training step compared, at the first batch size
    timing: bool = True        # the timed rows, one per batch size


# ----------------------------------------------------------------------------- the harness

class Registry(dict):
    """DeepfakeBench's registries: `@REGISTRY.register_module(module_name=...)` on a class."""

    def register_module(self, module_name):
        def add(cls):
            self[module_name] = cls
            return cls
        return add


class CrossEntropy(nn.Module):  # DeepfakeBench's "cross_entropy" loss: a tensor, not a dict
    def forward(self, logits, labels):
        return F.cross_entropy(logits, labels)


def clip_l14():
    """A CLIP ViT-L/14 with random weights, built offline (the release downloads `openai/clip-vit-large-patch14`)."""
    import transformers
    vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  patch_size=14, image_size=224, hidden_act="quick_gelu")
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    return transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=text,
                                                          projection_dim=768)).eval()


def load_release(root, clip):
    """The released DFDHRDetector class, imported from `root` with DeepfakeBench's pieces stubbed."""
    folder = Path(root) / "training" / "detectors"
    if not (folder / "dfd_hr_detector.py").is_file():
        raise SystemExit(f"{folder / 'dfd_hr_detector.py'}: not found; --release is the authors' repository root")
    detector_registry, losses = Registry(), Registry(cross_entropy=CrossEntropy)
    package = types.ModuleType("detectors")  # the release's package, without its __init__'s path edits
    package.__path__, package.DETECTOR = [str(folder)], detector_registry
    metrics = types.ModuleType("metrics.base_metrics_class")
    metrics.calculate_metrics_for_train = lambda label, pred: (0.0, 0.0, 0.0, 0.0)
    stubs = {"detectors": package, "loss": types.SimpleNamespace(LOSSFUNC=losses),
             "metrics": types.ModuleType("metrics"), "metrics.base_metrics_class": metrics}
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    try:
        module = importlib.import_module("detectors.dfd_hr_detector")
    finally:
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
    offline = types.SimpleNamespace(from_pretrained=lambda name: clip)  # both of its from_pretrained calls
    module.CLIPModel, module.AutoProcessor = offline, types.SimpleNamespace(from_pretrained=lambda name: None)
    return module.DFDHRDetector


RELEASE_CONFIG = {"backbone_name": "ViT-L/14_proj", "loss_func": "cross_entropy",
                  "backbone_config": {"layer": 24, "remain_layer": 20, "capacity": 0.75}}


# ----------------------------------------------------------------------------- the same weights

class Paired(NamedTuple):
    group: str              # experts, layer_judges, token_judges, fusion or head (DFDHR.param_groups' roles)
    ours: nn.Parameter      # one of ours' parameters
    view: Callable          # the part of it that holds the release's tensor (a slice, a transpose), of it or its .grad
    theirs: torch.Tensor    # the release's parameter


def paired_weights(release, ours):
    """Every weight the two detectors share under --ablation=released, ours' side as a view of one of its
    parameters (ours stacks the E experts of a mixture), so that the same pairs copy the weights and compare
    the gradients. The release routes layers K..L-2 (20-22) with judges indexed by layer."""
    L, K = ours.config.layers, ours.config.first_routed_layer
    assert list(ours.config.routed_layers) == list(range(K, L - 1)), "the release routes layers K..L-2 (20-22)"

    def alike(group, mine, theirs):  # modules whose parameters have the same names and shapes
        named = dict(theirs.named_parameters())
        return [Paired(group, p, lambda t: t, named[name]) for name, p in mine.named_parameters()]

    routers, pairs = ours.original_routers, []
    for i, experts in enumerate(routers.experts):
        released = (release.adapters_attn[i], release.adapters_mlp[i])
        for moa, theirs in zip((experts.after_attn, experts.after_mlp), released):
            pairs += alike("experts", moa.gate, theirs.gate)
            r = moa.adapter_rank
            for e, expert in enumerate(theirs.experts):  # Linear(D, r) -> GELU -> Linear(r, D)
                rows = slice(e * r, (e + 1) * r)  # ours' up-projection: expert e's r rows
                pairs += [Paired("experts", moa.up.weight, lambda t, rows=rows: t[rows], expert[0].weight),
                          Paired("experts", moa.up.bias, lambda t, rows=rows: t[rows], expert[0].bias),
                          Paired("experts", moa.down_weight, lambda t, e=e: t[e].T, expert[2].weight),  # (r, D)ᵀ
                          Paired("experts", moa.down_bias, lambda t, e=e: t[e], expert[2].bias)]
    for i in ours.config.routed_layers:
        pairs += alike("token_judges", routers.token_judge(i).proj, release.token_router[i].weight_predictor)
        pairs += alike("layer_judges", routers.layer_judge(i), release.layer_router[i])
    pairs += [Paired("fusion", ours.pool.query, lambda t: t, release.query_token)]
    pairs += alike("fusion", ours.pool.attn, release.query_attn) + alike("head", ours.head, release.head)
    assert {id(p.ours) for p in pairs} == {id(p) for p in ours.parameters() if p.requires_grad}, \
        "every weight ours trains comes from the release"
    for p in pairs:
        assert p.view(p.ours).shape == p.theirs.shape, (p.group, tuple(p.view(p.ours).shape), tuple(p.theirs.shape))
    return pairs


@torch.no_grad()
def copy_release_into_ours(release, ours):
    """Our modules take the release's weights: experts, token and layer judges, pooling, head."""
    for p in paired_weights(release, ours):
        p.view(p.ours).copy_(p.theirs)


def build(opts):
    torch.manual_seed(opts.seed)
    clip = clip_l14()
    release = load_release(opts.release, clip)(RELEASE_CONFIG)
    # One distribution for the weights both detectors train, the pooling's aside: N(0, 0.02), about the scale of
    # nn.Linear's default (std 1/sqrt(3 fan-in): 0.018 at fan-in 1024, 0.036 at the experts' 256), biases included.
    # Kept so that the weights, and so the exits, are the ones BENCHMARKS.md section 7 measured.
    with torch.no_grad():
        for name, p in release.named_parameters():
            if p.requires_grad and not name.startswith("query"):
                p.normal_(0, 0.02)
    vision = {k: v for k, v in clip.state_dict().items() if k.startswith(("vision_model.", "visual_projection."))}
    ours = DFDHR(make_config("paper", "released"), backbone=load_clip(vision, heads=16))
    copy_release_into_ours(release, ours)
    return release, ours


# ----------------------------------------------------------------------------- watching the release run

def release_by_view(orig, split):
    """The release's rows -> (B, V, ...): the original images (B, ...) and the split images (4B, ...), which it
    stacks split-major (row q·B + s is quadrant q of sample s; ours stacks a sample's four together)."""
    return torch.cat([orig[:, None], split.view(4, len(orig), *split.shape[1:]).transpose(0, 1)], 1)


class ReleaseRouting:
    """What the release's routers saw in one forward, read by hooks while its code runs unchanged: in a routed
    layer i its layer judge reads every row's CLS, and its token judge (inside the layer) only the rows still
    active, picked by index. Row r ran layer i if its CLS is among those the token judge read. It runs the
    original images, then the split images; each pass starts with the layer judge of layer K."""

    def __init__(self, release, config):
        self.routed, self.L, self.seen = config.routed_layers, config.layers, []
        self.hooks = [module.register_forward_pre_hook(partial(self.saw, i, kind)) for i in self.routed
                      for kind, module in (("judge", release.layer_router[i]), ("ran", release.token_router[i]))]

    def saw(self, i, kind, module, args):  # judge: (b, D) CLS; ran: (b', N, D) the active rows' tokens
        self.seen.append((i, kind, (args[0] if kind == "judge" else args[0][:, 0]).detach().clone()))

    def remove(self):
        for hook in self.hooks:
            hook.remove()

    def passes(self):
        """Per pass (original, split): {layer: (CLS each row's judge read (b, D), rows that ran it (b,))}."""
        out = []
        for i, kind, cls in self.seen:
            if kind == "judge":
                if i == self.routed.start:
                    out.append({})
                out[-1][i] = (cls, torch.zeros(len(cls), dtype=torch.bool))
            else:
                read, _ = out[-1][i]
                out[-1][i] = (read, (read[:, None] == cls[None]).all(-1).any(1))
        assert len(out) == 2, f"expected the original and the split pass, saw {len(out)}"
        return out

    def exit_layers(self):
        """(B, V) T per view: the first routed layer it did not run; L where it ran them all."""
        exits = []
        for layers in self.passes():
            T = torch.full((len(layers[self.routed.start][0]),), self.L)
            for i in reversed(self.routed):
                T = torch.where(layers[i][1], T, i)
            exits.append(T)
        return release_by_view(*exits)

    def judge_inputs(self, i):
        """(B, V, D) the CLS that layer i's judge read."""
        return release_by_view(*(layers[i][0] for layers in self.passes()))


@contextmanager
def watching(release, config):
    routing = ReleaseRouting(release, config)
    try:
        yield routing
    finally:
        routing.remove()


@contextmanager
def draws_in_our_order(release, batch):
    """The release's Gumbel draws, row for row those of ours. Both draw U ~ U(0, 1) from torch's generator, one
    per row, at each routed layer of each pass, in the same order (ours' torch.rand_like, the release's
    torch.rand in `sample_gumbel`): from one seed the same numbers, but the split images' rows are in another
    order. The release's source of Gumbel noise, `sample_gumbel`, is wrapped so that its row q·B + s gets ours'
    draw of row 4s + q; its forward is untouched."""
    home = sys.modules[type(release).__module__].gumbel_sigmoid_sample.__globals__
    draw = home["sample_gumbel"]

    def reordered(shape, device):
        g = draw(shape, device)  # elementwise in U: reordering g is reordering U
        if shape[0] == 4 * batch:  # the split pass: ours' row 4s + q is its row q·B + s
            g = g.view(batch, 4, *shape[1:]).transpose(0, 1).reshape(shape)
        return g

    home["sample_gumbel"] = reordered
    try:
        yield
    finally:
        home["sample_gumbel"] = draw


# ----------------------------------------------------------------------------- the checks

TOLERANCE = 1e-5  # max |Δ logits| of an agreement; a weight changed in ours must move the logits by more


class Case(NamedTuple):
    name: str
    release_exits: torch.Tensor  # (B, V) T per view, read by hooks
    ours_exits: torch.Tensor     # (B, V)
    max_abs_logit_diff: float
    release_gmac: float          # per image, estimate_flops at the exits that ran, multiply-adds
    ours_gmac: float
    changed: str                 # the weight changed in ours
    changed_diff: float          # max |Δ logits| with it changed: must exceed TOLERANCE

    def report(self):
        return (f"{self.name} (batch {len(self.ours_exits)}): exit layers per view, release "
                f"{self.release_exits.tolist()}, ours {self.ours_exits.tolist()} | max |Δ logits| "
                f"{self.max_abs_logit_diff:.2g} | GMAC per image at those exits: release {self.release_gmac:.1f}, "
                f"ours {self.ours_gmac:.1f} | {self.changed}: max |Δ logits| {self.changed_diff:.2g}")

    def failures(self):
        return [f"{self.name}: " + why for why, bad in (
            ("exit layers differ", not torch.equal(self.release_exits, self.ours_exits)),
            (f"max |Δ logits| {self.max_abs_logit_diff:.2g} > {TOLERANCE}", self.max_abs_logit_diff > TOLERANCE),
            (f"{self.changed}: max |Δ logits| {self.changed_diff:.2g}, not above {TOLERANCE}",
             self.changed_diff <= TOLERANCE)) if bad]


@contextmanager
def changed(tensor, seed=0):
    """`tensor`, a view into one of ours' weights, with noise of its own std added; restored afterwards."""
    kept = tensor.detach().clone()
    with torch.no_grad():
        tensor.add_(torch.randn(tensor.shape, generator=torch.Generator().manual_seed(seed)) * kept.std())
    try:
        yield
    finally:
        with torch.no_grad():
            tensor.copy_(kept)


def expert(ours, i):
    """Layer i's first expert after the MLP, its up-projection: a view into ours' weights."""
    moa = ours.original_routers.experts[i].after_mlp
    return f"layer {i}'s expert 0", moa.up.weight[:moa.adapter_rank]


def token_judge(ours, i):
    return f"layer {i}'s token judge", ours.original_routers.token_judge(i).proj.weight


@torch.no_grad()
def let_through(release, layers):
    """The release's layer judges at `layers` answer > 0 for every row: non-negative output weights on ReLU units."""
    for i in layers:
        release.layer_router[i].fc2.weight.abs_()


@torch.no_grad()
def answer(release, i, cls, logits):
    """The release's layer judge at layer i answers `logits` (n,) to the CLS `cls` (n, D), n <= D: the linear judge
    w·c as two ReLU units, w and -w, with output weights 1 and -1; w the least-norm solution of cls·w = logits."""
    w = torch.linalg.pinv(cls.double()) @ logits.double()  # (D,)
    judge = release.layer_router[i]
    judge.fc1.weight.zero_()
    judge.fc1.weight[:2] = torch.stack([w, -w]).float()
    judge.fc2.weight.zero_()
    judge.fc2.weight[0, :2] = torch.tensor([1.0, -1.0])


def check_case(name, release, ours, x, change):
    """Both detectors in eval on x after copying the release's weights into ours; then ours with one of its
    copied weights perturbed, `change(ours, exits)`. Returns the Case and what the release's routers saw."""
    copy_release_into_ours(release, ours)
    release.eval(), ours.eval()
    with torch.no_grad(), watching(release, ours.config) as seen:
        theirs = release({"image": x})["cls"]
    exits = seen.exit_layers()
    with torch.no_grad():
        out = ours(x)
        what, weight = change(ours, exits)
        with changed(weight):
            moved = (ours(x).logits - theirs).abs().max().item()
    case = Case(name, exits, out.exit_layer.cpu(), (out.logits - theirs).abs().max().item(),
                estimate_flops(ours.config, exits).sum(1).double().mean().item() / 1e9,
                out.flops.double().mean().item() / 1e9, what + " changed in ours", moved)
    return case, seen


def deepest_run(config, exits):
    """The last routed layer that ran for some view; if none did, layer L-1, which runs for all."""
    return max([i for i in config.routed_layers if (exits > i).any()], default=config.layers - 1)


def check_cases(release, ours, x):
    """The three cases, each with a copied weight of a layer that ran changed in ours (it must show):
    the weights as built; every view through every routed layer (the release's judges answer > 0); exits mixed
    within the batch, the views alternately leaving at K+1 and running on (its judge at K+1 answers +0.5 and
    -0.5 to the CLS the all-through run showed it, the others > 0). The release's judges are restored after."""
    cfg = ours.config
    K, last = cfg.first_routed_layer, cfg.routed_layers[-1]
    kept = copy.deepcopy(release.layer_router.state_dict())
    try:
        built, _ = check_case("as built", release, ours, x, lambda m, exits: expert(m, deepest_run(cfg, exits)))
        let_through(release, cfg.routed_layers)
        through, seen = check_case("all through", release, ours, x, lambda m, exits: expert(m, last))
        cls = seen.judge_inputs(K + 1)  # (B, V, D)
        signs = 1 - 2 * (torch.arange(cls.shape[0] * cls.shape[1]) % 2)  # +, -, +, ... over the views in order
        answer(release, K + 1, cls.flatten(0, 1), 0.5 * signs)
        mixed, _ = check_case("mixed", release, ours, x, lambda m, exits: token_judge(m, K + 1))
    finally:
        release.layer_router.load_state_dict(kept)
        copy_release_into_ours(release, ours)
    return [built, through, mixed]


class Training(NamedTuple):
    release_exits: torch.Tensor  # (B, V) T per view in the training forward
    ours_exits: torch.Tensor
    same_draws: bool             # torch's generator in the same state after either forward
    release_ce: float
    ours_ce: float
    release_rank: float          # L_rank as each computes it (no gradient in either)
    ours_rank: float
    release_gmac: float          # forward multiply-adds per image: the release at its exits, ours every row
    ours_gmac: float
    grads: dict                  # group -> (max |Δ grad|, max |grad| of the release's), or None: no gradient in either

    def report(self):
        return (f"training step (batch {len(self.ours_exits)}): exit layers per view, release "
                f"{self.release_exits.tolist()}, ours {self.ours_exits.tolist()} | the same Gumbel draws: "
                f"{self.same_draws} | cross-entropy release {self.release_ce:.7g}, ours {self.ours_ce:.7g} | "
                f"L_rank release {self.release_rank:.7g}, ours {self.ours_rank:.7g} | forward GMAC per image: "
                f"release {self.release_gmac:.1f} (its exits), ours {self.ours_gmac:.1f} (every row)\n"
                + "\n".join(f"  gradient of {group}: " + ("none in either" if v is None else
                                                           f"max |Δ| {v[0]:.2g}, max |release's| {v[1]:.2g}")
                            for group, v in self.grads.items()))

    def failures(self):
        why = [("exit layers differ", not torch.equal(self.release_exits, self.ours_exits)),
               ("the two drew different numbers of Gumbel samples", not self.same_draws),
               (f"cross-entropy differs by {abs(self.release_ce - self.ours_ce):.2g}",
                abs(self.release_ce - self.ours_ce) > TOLERANCE)]
        why += [(f"{group}: max |Δ grad| {v[0]:.2g} > {GRAD_TOLERANCE} × max |grad| {v[1]:.2g}",
                 v[0] > GRAD_TOLERANCE * v[1]) for group, v in self.grads.items() if v is not None]
        return [f"training step: {w}" for w, bad in why if bad]


GRAD_TOLERANCE = 1e-4  # max |Δ grad| of a group, relative to its largest gradient


def check_training(release, ours, x, y, seed=0):
    """One training forward and backward of each on (x, y) from the same seed, the release's Gumbel draws put in
    ours' order of rows (draws_in_our_order): the exits, the cross-entropy and the gradient of every weight both
    train. Both use the release's hard gate in training (the judges get no gradient), so a view runs the same
    layers in both and the gradients differ by fp32 rounding only, set relative to each group's largest."""
    copy_release_into_ours(release, ours)
    release.train(), ours.train()
    release.zero_grad(set_to_none=True), ours.zero_grad(set_to_none=True)
    data = {"image": x, "label": y}
    torch.manual_seed(seed)
    with watching(release, ours.config) as seen, draws_in_our_order(release, len(x)):
        pred = release(data)
        release.get_losses(data, pred)["overall"].backward()
    after_release = torch.get_rng_state()
    torch.manual_seed(seed)
    out = ours(x)
    after_ours = torch.get_rng_state()
    loss = dfdhr_loss(out, y, ours.config)
    loss.total.backward()
    grads = {}
    for p in paired_weights(release, ours):
        if p.ours.grad is None and p.theirs.grad is None:
            grads.setdefault(p.group, None)
            continue
        zero = torch.zeros_like(p.theirs)  # the release's weights of a layer no row ran get no gradient
        mine = zero if p.ours.grad is None else p.view(p.ours.grad)
        theirs = zero if p.theirs.grad is None else p.theirs.grad
        d, g = grads.get(p.group) or (0.0, 0.0)
        grads[p.group] = (max(d, (mine - theirs).abs().max().item()), max(g, theirs.abs().max().item()))
    exits = seen.exit_layers()
    return Training(exits, out.exit_layer.cpu(), torch.equal(after_release, after_ours),
                    F.cross_entropy(pred["cls"], y).item(), loss.ce.item(),
                    float(pred["loss_spearman"]), loss.rank.item(),
                    estimate_flops(ours.config, exits).sum(1).double().mean().item() / 1e9,
                    (len(out.exit_layer[0]) * estimate_flops(ours.config)) / 1e9, grads)


# ----------------------------------------------------------------------------- measurements

def training_step(model, loss_of, x, y):
    """One step of either detector, driven alike: its own loss, backward, Adam (train.train_step
    drives ours alone, and the release's forward takes a dict)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=5e-4)

    def step():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss_of(x, y).backward()
        opt.step()
    return step


def batch_of(batch):
    """The inputs of a row: seeded 448 px images and alternating labels."""
    return torch.randn(batch, 3, 448, 448, generator=torch.Generator().manual_seed(batch)), torch.arange(batch) % 2


def compare(release, ours, batch, opts):
    """One row: the two detectors timed in turn (measure.timed), medians of `repeats` after a warm-up."""
    x, y = batch_of(batch)
    release.eval(), ours.eval()
    row = dict(batch=batch)
    with torch.no_grad():
        row["max_abs_logit_diff"] = (release({"image": x})["cls"] - ours(x).logits).abs().max().item()
        t = timed([lambda: release({"image": x}), lambda: ours(x)], repeats=opts.repeats)
    row.update(release_eval_s=t[0], ours_eval_s=t[1], eval_release_over_ours=t[0] / t[1])
    if opts.train:
        def release_loss(x, y):
            data = {"image": x, "label": y}
            return release.get_losses(data, release(data))["overall"]

        steps = dict(release=training_step(release, release_loss, x, y),
                     ours=training_step(ours, lambda x, y: dfdhr_loss(ours(x), y, ours.config).total, x, y))
        t = timed(list(steps.values()), repeats=opts.repeats)
        row.update(release_train_s=t[0], ours_train_s=t[1], train_release_over_ours=t[0] / t[1])
        if opts.profile:  # where each training step's time goes, by kind of operator
            for name, step in steps.items():
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    step()
                _, ops, kinds, total = breakdown(prof, top=12)
                print(f"\n{name}, training step at batch {batch}: {total / 1e6:.1f} s self CPU time\n\n"
                      f"{table(kinds, ['kind', 'self_ms', 'share'])}\n\n{table(ops, ['op', 'calls', 'self_ms', 'share'])}",
                      flush=True)
    return row


def main(argv):
    opts = Options(**cli.parse(argv, Options)[0])
    if not opts.release:
        print("bench_release: skipped, no --release=PATH (a checkout of the authors' DFD-HR repository)")
        return None
    for package in ("einops", "transformers"):
        if importlib.util.find_spec(package) is None:
            raise SystemExit(f"bench_release: the released detector needs {package} (pip install {package})")
    if opts.malloc not in ("kept", "default"):
        raise SystemExit(f"--malloc={opts.malloc}: choose kept or default")
    if opts.malloc == "kept":
        speed.keep_freed_memory()  # for both detectors: the setting is the process's
    release, ours = build(opts)
    batches = list(map(int, opts.batches.split(",")))
    cases, training, failures, rows = [], None, [], []
    if opts.checks:
        x, y = batch_of(batches[0])
        cases = check_cases(release, ours, x)
        for case in cases:
            print(case.report(), flush=True)
        training = check_training(release, ours, x, y, opts.seed)
        print(training.report(), flush=True)
        failures = [f for c in cases for f in c.failures()] + training.failures()
    if opts.timing:
        for batch in batches:
            rows.append(compare(release, ours, batch, opts))
            print(" | ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rows[-1].items()),
                  flush=True)
    if failures:
        raise SystemExit("bench_release: the two detectors disagree: " + "; ".join(failures))
    return dict(cases=cases, training=training, rows=rows)

if __name__ == "__main__":
    main(sys.argv[1:])
