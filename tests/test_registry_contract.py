"""The contract every registered router kind keeps with every registered expert kind, on Linear layers (a toy MLP)
and Conv2d layers (a toy CNN): shapes, gates that sum to one (zero where kept on the base), gradient flow,
determinism, save and load, growth, fast ops equal to their loop reference, frozen rows through AdamW, and
keep-base samples equal to the base model bit for bit. The cases come from the registries at collection time, so a
new kind is covered as soon as it is registered. Last, three properties of the source tree: no router names
compared outside the routers, no import cycles, and `train/` independent of `loramix.methods`."""

from __future__ import annotations

import ast
import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import loramix
from loramix.errors import ConfigError, InjectionError
from loramix.experts import EXPERT_KINDS, AdaptedLayer
from loramix.frozen_rows import FrozenRows
from loramix.inject import BUILDERS, adapter_state, get_info, is_injected
from loramix.routers import ROUTERS, Gate
from tests.models import BATCH, TOKENS, cnn_inputs, mlp_inputs, tiny_cnn, tiny_mlp

SRC = Path(__file__).resolve().parents[1] / "src" / "loramix"
NUM_EXPERTS = NUM_TASKS = 3  # equal, so that router 'task' needs no task_to_expert
KEEP = torch.tensor([True, False, False, True])

# layer type -> (model builder, inputs, targets)
LAYERS: dict[str, tuple[Callable[[int], nn.Module], Callable[[], Tensor], Any]] = {
    "linear": (tiny_mlp, mlp_inputs, "all-linear"),
    "conv2d": (tiny_cnn, cnn_inputs, ["conv1", "conv2"]),
}


def refusal(layer_type: str, router: str, experts: str) -> str | None:
    """Why the layer type's wrapper refuses this router / expert kind (its own `check`), or None."""
    make, _, targets = LAYERS[layer_type]
    with torch.random.fork_rng():  # collection leaves the global generator as it found it
        model = make(0)
    for name, module in model.named_modules():
        if targets != "all-linear" and name not in targets:
            continue
        check = next((getattr(cls, "check", None) for _, accepts, cls in BUILDERS if accepts(module)), None)
        try:
            if check is not None:
                check(module, name, per_token=ROUTERS[router].per_token, expert_kind=experts)
        except InjectionError as exc:
            return str(exc)
    return None


COMBOS = [(lt, r, e, refusal(lt, r, e)) for lt in LAYERS for r in ROUTERS for e in EXPERT_KINDS]
CASES = [
    pytest.param(lt, r, e, id=f"{lt}-{r}-{e}", marks=[pytest.mark.skip(reason=why)] if why else [])
    for lt, r, e, why in COMBOS
]
REFUSED = [pytest.param(lt, r, e, id=f"{lt}-{r}-{e}") for lt, r, e, why in COMBOS if why]
ARGS = ("layer_type", "router", "experts")


def config_for(router: str, experts: str, **overrides: Any) -> loramix.AdapterConfig:
    """The smallest config of a kind: one expert without a router (a plain LoRA), else three; tasks if it uses
    them."""
    cls = ROUTERS[router]
    fields: dict[str, Any] = {
        "router": router,
        "experts": experts,
        "num_experts": 1 if cls.scope is None else NUM_EXPERTS,
        "rank": 4,
        "router_hidden": 8,
    }
    if cls.needs_num_tasks:
        fields["num_tasks"] = NUM_TASKS
    return loramix.AdapterConfig(**{**fields, **overrides})


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 2, std: float = 0.3) -> None:
    """Every adapter and router parameter drawn from a seeded generator: zero-initialised outputs (LoRA's B, an
    adapter's up projection) and uniform routers would hide what the checks look for."""
    generator = torch.Generator().manual_seed(seed)
    for param in adapter_state(model).values():
        param.copy_(torch.randn(param.shape, generator=generator) * std)


def build(
    layer_type: str, router: str, experts: str, **overrides: Any
) -> tuple[nn.Module, Tensor, Tensor, nn.Module]:
    """An adapted toy model with random adapters (in eval), its inputs, the base model's output on them, and an
    untouched copy of the base model."""
    make, inputs, targets = LAYERS[layer_type]
    model = make(0).eval()
    x = inputs()
    with torch.no_grad():
        base = model(x)
    pristine = copy.deepcopy(model)
    loramix.inject(model, config_for(router, experts, targets=targets, **overrides))
    randomize(model)
    return model.eval(), x, base, pristine


def default_task_ids(model: nn.Module, n: int) -> Tensor | None:
    info = get_info(model)
    if not info.router_class.needs_task_ids:
        return None
    return torch.arange(n) % info.config.num_tasks


def forward(
    model: nn.Module, x: Tensor, *, task_ids: Tensor | None = None, keep_base: Tensor | None = None
) -> tuple[Tensor, loramix.RoutingState]:
    """One forward inside the routing block, with task ids covering every task where the router needs them."""
    if task_ids is None:
        task_ids = default_task_ids(model, x.shape[0])
    with loramix.routing(model, task_ids=task_ids, keep_base=keep_base) as state:
        out = model(x)
    return out, state


def expected_record_names(model: nn.Module) -> list[str]:
    info = get_info(model)
    return {"model": ["model"], "layer": info.names, None: []}[info.router_class.scope]


def check_gates(state: loramix.RoutingState, model: nn.Module, keep: Tensor | None = None) -> None:
    """Shapes `(n, e)` (`(n, t, e)` per token); rows sum to one, or are exactly zero for kept samples."""
    info = get_info(model)
    num_experts = info.config.num_experts
    assert [name for name, _ in state.records] == expected_record_names(model)
    expected = (BATCH, TOKENS, num_experts) if info.router_class.per_token else (BATCH, num_experts)
    for name, gate in state.records:
        assert gate.weights.shape == expected, name
        assert gate.weights.dtype == torch.float32, name
        sums = gate.weights.sum(-1)
        wanted = torch.ones_like(sums)
        if keep is not None:
            wanted[keep] = 0.0
            assert torch.equal(gate.keep, keep), name
            assert torch.equal(gate.weights[keep], torch.zeros_like(gate.weights[keep])), name
        torch.testing.assert_close(sums, wanted, atol=1e-6, rtol=0)


@pytest.mark.parametrize(ARGS, CASES)
def test_outputs_and_recorded_gates_have_their_shapes(layer_type: str, router: str, experts: str) -> None:
    """The output has the base model's shape and dtype; each router records one gate per decision, `(n, [t,] e)`."""
    model, x, base, _ = build(layer_type, router, experts)
    out, state = forward(model, x)
    assert out.shape == base.shape and out.dtype == base.dtype
    check_gates(state, model)


@pytest.mark.parametrize(ARGS, CASES)
def test_gates_sum_to_one_and_to_zero_for_samples_kept_on_the_base(
    layer_type: str, router: str, experts: str
) -> None:
    """Every gate row sums to one, and to exactly zero for the samples sent to the base (keep_base)."""
    model, x, _, _ = build(layer_type, router, experts)
    for training in (False, True):
        _, state = forward(model.train(training), x, keep_base=KEEP)
        check_gates(state, model, KEEP)


@pytest.mark.parametrize(ARGS, CASES)
def test_gradient_reaches_every_trainable_adapter_and_router_parameter(
    layer_type: str, router: str, experts: str
) -> None:
    """In training, every adapter and router parameter gets a non-zero gradient and nothing else gets one (with
    noisy routing too, where the router takes it: its noise parameters act in training only)."""
    variants: list[dict[str, Any]] = [{}]
    if ROUTERS[router].uses_top_k:
        variants.append({"noisy": True})
    for overrides in variants:
        model, x, _, _ = build(layer_type, router, experts, **overrides)
        out, _ = forward(model.train(), x)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
        adapter = adapter_state(model)
        info = get_info(model)
        routers = [
            m for layer in info.layers for m in (layer.router, getattr(layer, "model_router", None)) if m
        ]
        router_params = {id(p) for r in routers for p in r.parameters()}
        assert router_params <= {id(p) for p in adapter.values()}  # so the loop below checks them
        for name, param in adapter.items():
            assert param.requires_grad, name
            assert param.grad is not None and param.grad.abs().sum() > 0, (overrides, name)
        for name, param in model.named_parameters():
            if name not in adapter:
                assert not param.requires_grad and param.grad is None, name


@pytest.mark.parametrize(ARGS, CASES)
def test_eval_forwards_are_bit_identical(layer_type: str, router: str, experts: str) -> None:
    """Two forwards in eval give bit-identical outputs and gates."""
    model, x, _, _ = build(layer_type, router, experts)
    first, state1 = forward(model, x)
    second, state2 = forward(model, x)
    assert torch.equal(first, second)
    for (_, g1), (_, g2) in zip(state1.records, state2.records, strict=True):
        assert torch.equal(g1.weights, g2.weights)


@pytest.mark.parametrize(ARGS, CASES)
def test_save_then_load_into_a_fresh_model_gives_bit_identical_outputs(
    layer_type: str, router: str, experts: str, tmp_path: Path
) -> None:
    """Adapters saved and loaded into a fresh copy of the base model reproduce its outputs bit for bit."""
    model, x, _, pristine = build(layer_type, router, experts)
    expected, _ = forward(model, x)
    loramix.save(model, tmp_path)
    torch.manual_seed(123)  # the fresh model's initial adapters differ: only the load can make them equal
    loaded = loramix.load(copy.deepcopy(pristine), tmp_path).eval()
    got, _ = forward(loaded, x)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(ARGS, CASES)
def test_grow_keeps_old_rows_and_old_tasks_and_round_trips(
    layer_type: str, router: str, experts: str, tmp_path: Path
) -> None:
    """Growing by 2 experts (and 1 task) keeps every old parameter row exactly, adds experts that add nothing, keeps
    old tasks' outputs bit-identical for routers that know tasks, records the sizes, and saves and loads.

    A task-agnostic router (sample, token) cannot keep its outputs: its new experts join every decision at once;
    what holds there is the old rows' exact values. A model without a router holds one expert and is refused."""
    model, x, _, pristine = build(layer_type, router, experts)
    info = get_info(model)
    cls, config = info.router_class, info.config
    if cls.scope is None:
        with pytest.raises(ConfigError):
            loramix.grow(model, num_experts=config.num_experts + 2)
        return
    old_tasks = default_task_ids(model, BATCH)
    before, _ = forward(model, x, task_ids=old_tasks)
    old = {name: p.detach().clone() for name, p in adapter_state(model).items()}
    num_tasks = config.num_tasks + 1 if cls.needs_num_tasks else None
    loramix.grow(model, num_experts=config.num_experts + 2, num_tasks=num_tasks)

    grown = get_info(model).config
    assert grown.num_experts == config.num_experts + 2
    assert grown.num_tasks == (num_tasks or config.num_tasks)
    params = adapter_state(model)
    assert set(params) == set(old)  # names stay stable whatever the number of experts
    for name, value in old.items():
        assert torch.equal(params[name][tuple(slice(0, size) for size in value.shape)], value), name
    for layer in info.layers:
        bank = layer.experts
        assert bank.num_experts == grown.num_experts
        new_only = torch.zeros(2, TOKENS, grown.num_experts)
        new_only[..., config.num_experts :] = 1.0
        probe = torch.randn(2, TOKENS, bank.in_features, generator=torch.Generator().manual_seed(4))
        added = bank.loop_reference(probe, new_only, layer.scaling)
        assert torch.equal(added, torch.zeros_like(added)), layer.layer_name

    after, state = forward(model, x, task_ids=old_tasks)
    check_gates(state, model)
    if cls.needs_task_ids:
        assert torch.equal(after, before)  # old tasks route as they did
        new_task = torch.full((BATCH,), grown.num_tasks - 1)
        _, state = forward(model, x, task_ids=new_task)
        check_gates(state, model)

    loramix.save(model, tmp_path)
    loaded = loramix.load(copy.deepcopy(pristine), tmp_path).eval()
    assert get_info(loaded).config == grown
    for task_ids in [None] + ([torch.arange(BATCH) % grown.num_tasks] if cls.needs_task_ids else []):
        expected, _ = forward(model, x, task_ids=task_ids)
        got, _ = forward(loaded, x, task_ids=task_ids)
        assert torch.equal(got, expected)


def layer_inputs(model: nn.Module, x: Tensor, **kwargs: Any) -> tuple[dict[str, tuple[Tensor, Tensor]], Any]:
    """Each adapted layer's input and output in one forward, and the routing state."""
    seen: dict[str, tuple[Tensor, Tensor]] = {}

    def hook(module: AdaptedLayer, args: tuple, kw: dict, out: Tensor) -> None:
        seen[module.layer_name] = (args[0], out)

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in get_info(model).layers]
    try:
        _, state = forward(model, x, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return seen, state


def reference_delta(layer: AdaptedLayer, x: Tensor, weights: Tensor) -> Tensor:
    """The mixture by the bank's loop reference: on a Conv2d, on the unfolded patches (`A` is `(e, r, c*k*k)`)."""
    base = layer.base_layer
    if isinstance(base, nn.Conv2d):
        patches = F.unfold(x, base.kernel_size, base.dilation, base.padding, base.stride)  # (n, c*k*k, L)
        out = layer.experts.loop_reference(patches.transpose(1, 2), weights, layer.scaling)  # (n, L, o)
        size = base(x).shape[-2:]
        return out.transpose(1, 2).reshape(x.shape[0], -1, *size)
    x3 = x.reshape(x.shape[0], -1, x.shape[-1])
    return layer.experts.loop_reference(x3, weights, layer.scaling).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize(ARGS, CASES)
def test_fast_ops_equal_the_loop_reference(layer_type: str, router: str, experts: str) -> None:
    """Each layer's forward minus its base, and its `delta`, equal the bank's loop reference under the recorded
    gate (soft, and top-1 where the router takes top_k)."""
    variants: list[dict[str, Any]] = [{}]
    if ROUTERS[router].uses_top_k:
        variants.append({"top_k": 1})
    for overrides in variants:
        model, x, _, _ = build(layer_type, router, experts, **overrides)
        seen, state = layer_inputs(model, x)
        records = dict(state.records)
        for layer in get_info(model).layers:
            inp, out = seen[layer.layer_name]
            gate: Gate | None = {
                "layer": records.get(layer.layer_name),
                "model": state.model_gate,
                "none": None,
            }[layer.gate_source]
            weights = torch.ones(x.shape[0], 1) if gate is None else gate.weights
            with torch.no_grad():
                expected = reference_delta(layer, inp, weights)
                torch.testing.assert_close(out - layer.base_layer(inp), expected, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(layer.delta(inp, gate), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(ARGS, CASES)
def test_frozen_rows_stay_bit_identical_through_adamw_and_save(
    layer_type: str, router: str, experts: str, tmp_path: Path
) -> None:
    """Expert 0 (and task 0's router, where routers freeze by task) frozen: bit-identical after 5 AdamW steps with
    weight decay while the other rows train, and a save then holds the frozen values."""
    model, x, _, pristine = build(layer_type, router, experts)
    for layer in get_info(model).layers:
        layer.experts.freeze_experts([0])
    task_routers = [m for m in model.modules() if hasattr(m, "freeze_tasks")]
    for module in task_routers:
        module.freeze_tasks([0])
    frozen = [m for m in model.modules() if isinstance(m, FrozenRows) and m.frozen_rows]
    assert len(frozen) == len(get_info(model).layers) + len(task_routers)
    before = [{name: value.detach().clone() for name, value in m.effective().items()} for m in frozen]

    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.05, weight_decay=0.1)
    target = torch.randn(forward(model, x)[0].shape, generator=torch.Generator().manual_seed(5))
    for _ in range(5):
        out, _ = forward(model, x)
        optimizer.zero_grad()
        ((out - target) ** 2).mean().backward()
        optimizer.step()

    for module, kept in zip(frozen, before, strict=True):
        for name, value in module.effective().items():
            assert torch.equal(value[0], kept[name][0]), (type(module).__name__, name)
            if value.shape[0] > 1:
                assert not torch.equal(value[1:], kept[name][1:]), (type(module).__name__, name)

    model.eval()
    expected, _ = forward(model, x)
    loramix.save(model, tmp_path)
    loaded = loramix.load(copy.deepcopy(pristine), tmp_path).eval()
    got, _ = forward(loaded, x)
    assert torch.equal(got, expected)


@pytest.mark.parametrize(ARGS, CASES)
def test_kept_samples_give_the_base_models_output_bit_for_bit(
    layer_type: str, router: str, experts: str
) -> None:
    """In one batched forward, samples with keep_base give exactly the base model's output, the others differ."""
    model, x, base, _ = build(layer_type, router, experts)
    for training in (False, True):
        out, _ = forward(model.train(training), x, keep_base=KEEP)
        assert torch.equal(out[KEEP], base[KEEP])
        for i in torch.nonzero(~KEEP).flatten().tolist():
            assert not torch.allclose(out[i], base[i], atol=1e-4), i


@pytest.mark.parametrize(ARGS, REFUSED)
def test_refused_combinations_are_refused_at_injection(layer_type: str, router: str, experts: str) -> None:
    """A router or expert kind the layer type cannot take is an InjectionError that leaves the model untouched."""
    make, _, targets = LAYERS[layer_type]
    model = make(0)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(InjectionError):
        loramix.inject(model, config_for(router, experts, targets=targets))
    assert not is_injected(model)
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())


# ---- the source tree --------------------------------------------------------------------------------------------

NAME_COMPARISON = re.compile(
    r"""\brouter\s*(?:==|!=)\s*[rbuf]?["']"""  # router == "task", config.router != 'none'
    r"""|["'][\w-]*["']\s*(?:==|!=)\s*[\w.]*\brouter\b"""  # "task" == config.router
    r"""|\brouter\s+(?:not\s+)?in\s+[(\[{]"""  # router in ("task", "poly")
)


def python_files(root: Path = SRC) -> list[Path]:
    return sorted(root.rglob("*.py"))


def test_nothing_outside_the_routers_compares_router_names() -> None:
    """Outside `routers/`, no code compares a router's name with a literal: it reads the class's attributes."""
    examples = [
        'if config.router == "task":',
        "if router != 'none':",
        'if info.config.router in ("task", "poly"):',
        'if "sample" == self.config.router:',
    ]
    assert all(NAME_COMPARISON.search(line) for line in examples)
    routers = SRC / "routers"
    hits = [
        f"{path.relative_to(SRC)}:{number}: {line.strip()}"
        for path in python_files()
        if routers not in path.parents
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if NAME_COMPARISON.search(line)
    ]
    assert hits == [], "\n".join(hits)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, modules: set[str], type_only: bool = False) -> set[str]:
    """The `loramix` modules a file imports anywhere (functions included); those under `if TYPE_CHECKING:` only
    with `type_only`.
    `from a import b` names the module `a.b` when `b` is a submodule, else `a`."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and is_type_checking(child.test) and not type_only:
                for other in child.orelse:
                    visit_one(other)
            else:
                visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        visit(node)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return {m for m in found if m in modules and m != name}


def import_graph(type_only: bool = False) -> dict[str, set[str]]:
    paths = {module_name(path): path for path in python_files()}
    return {name: imports_of(path, set(paths), type_only) for name, path in paths.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.mark.parametrize("type_only", [False, True], ids=["run-time imports", "with annotation-only imports"])
def test_the_package_has_no_import_cycles(type_only: bool) -> None:
    """The graph of `loramix` imports (function-level ones included; with or without those only annotations need,
    under TYPE_CHECKING) is acyclic: the adapter config sits below the expert and router kinds that read it."""
    graph = import_graph(type_only)
    assert graph["loramix.experts.lora"] >= {"loramix.experts.base", "loramix.experts.ops"}
    assert ("loramix.config" in graph["loramix.experts.base"]) == type_only
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_train_imports_nothing_from_methods() -> None:
    """No module of `loramix.train` imports `loramix.methods`, directly or through other modules."""
    graph = import_graph()
    for start in (name for name in graph if name.startswith("loramix.train")):
        reached_from, todo = {start: start}, [start]  # module -> the module that imports it on the way
        while todo:
            node = todo.pop()
            for nxt in graph[node] - set(reached_from):
                reached_from[nxt] = node
                todo.append(nxt)
        bad = sorted(name for name in reached_from if name.startswith("loramix.methods"))
        assert not bad, f"{start} reaches {bad[0]} (imported by {reached_from[bad[0]]})"


@pytest.mark.parametrize(ARGS, [c for c in CASES if c.values[1] == "task"])
def test_an_expert_copied_from_a_frozen_one_adds_what_it_adds_and_a_frozen_one_is_not_overwritten(
    layer_type: str, router: str, experts: str
) -> None:
    """`copy_expert` reads a frozen expert's kept values, not its parameter (which an optimizer may have moved)."""
    model, _, _, _ = build(layer_type, router, experts)
    for layer in get_info(model).layers:
        bank = layer.experts
        bank.freeze_experts([0])
        with torch.no_grad():
            for name in bank.stacked:
                param = getattr(bank, name)
                if param.shape[0] > 1:
                    param[0].add_(1.0)  # moved under the frozen row: its kept values are what it adds
        probe = torch.randn(2, TOKENS, bank.in_features, generator=torch.Generator().manual_seed(4))
        only = [torch.zeros(2, TOKENS, bank.num_experts) for _ in range(2)]
        only[0][..., 0], only[1][..., 2] = 1.0, 1.0
        kept = bank.loop_reference(probe, only[0], layer.scaling)
        assert not torch.equal(bank.loop_reference(probe, only[1], layer.scaling), kept)
        bank.copy_expert(0, 2)
        assert torch.equal(bank.loop_reference(probe, only[1], layer.scaling), kept), layer.layer_name
        with pytest.raises(ConfigError, match="row 0 is frozen"):
            bank.copy_expert(2, 0)
