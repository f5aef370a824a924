"""Model: forward shapes for every cell, carried state, init_state and detach_state, and generation."""

import pytest
import torch

from charrnn.errors import UsageError
from charrnn.model import CharRNN, ModelArgs, Stepper, detach_state, dropout, generate, pick_next, resolve_device

V, E, H = 11, 8, 16


def make(cell: str, layers: int = 1, dropout: float = 0.0) -> CharRNN:
    torch.manual_seed(0)
    return CharRNN(ModelArgs(vocab_size=V, cell=cell, embed_size=E, hidden_size=H, num_layers=layers,
                             dropout=dropout))


def ids(B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("layers", [1, 2])
def test_forward_shapes(cell, layers):
    model = make(cell, layers)
    logits, state = model(ids(3, 5))
    assert logits.shape == (3, 5, V)
    assert isinstance(state, tuple)
    assert len(state) == (2 if cell == "lstm" else 1)
    for s in state:
        assert s.shape == (layers, 3, H)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_init_state_shapes_and_zeros(cell):
    model = make(cell, 2)
    state = model.init_state(4)
    assert len(state) == (2 if cell == "lstm" else 1)
    for s in state:
        assert s.shape == (2, 4, H)
        assert not s.any()
    # a zero state behaves like no state
    x = ids(4, 6)
    model.eval()
    assert torch.allclose(model(x, state)[0], model(x)[0], atol=1e-6)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_state_carries_across_calls(cell):
    model = make(cell, 2, dropout=0.3).eval()
    x = ids(2, 12, seed=1)
    with torch.no_grad():
        whole, s_whole = model(x)
        first, s1 = model(x[:, :7])
        second, s2 = model(x[:, 7:], s1)
    assert torch.allclose(torch.cat([first, second], dim=1), whole, atol=1e-5)
    for a, b in zip(s2, s_whole):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_state_matters(cell):
    model = make(cell).eval()
    x = ids(2, 6, seed=2)
    with torch.no_grad():
        _, state = model(ids(2, 6, seed=3))
        assert not torch.allclose(model(x, state)[0], model(x)[0])


def test_detach_state_cuts_the_graph():
    model = make("lstm")
    _, state = model(ids(2, 4))
    assert all(s.requires_grad for s in state)
    cut = detach_state(state)
    assert all(not s.requires_grad and s.grad_fn is None for s in cut)
    for a, b in zip(cut, state):
        assert torch.equal(a, b)
    # the detached state still feeds a differentiable second batch
    logits, _ = model(ids(2, 4, seed=5), cut)
    logits.sum().backward()
    assert model.head.weight.grad is not None


def test_without_detach_backward_reaches_previous_batch():
    model = make("gru")
    emb_before = model.embed.weight
    x1 = ids(1, 3, seed=1)
    x2 = torch.full((1, 3), V - 1)
    x1 = x1.clamp(max=V - 2)  # batches use disjoint characters
    _, state = model(x1)
    logits, _ = model(x2, state)
    logits.sum().backward()
    grad_rows = emb_before.grad.abs().sum(dim=1)
    assert grad_rows[x1[0]].sum() > 0  # the graph goes back into batch one
    model.zero_grad()
    _, state = model(x1)
    logits, _ = model(x2, detach_state(state))
    logits.sum().backward()
    assert emb_before.grad.abs().sum(dim=1)[x1[0]].sum() == 0  # cut


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("streams", [1, 3])
def test_stepper_equals_the_model_step_by_step_and_after_reorder(cell, streams):
    model = make(cell, layers=2).eval()
    x = ids(streams, 6)
    with torch.no_grad():
        logits, _ = model(x)
        _, state = model(x[:, :1])
        step = Stepper(model, state)
        for t in range(1, 4):
            torch.testing.assert_close(step(x[:, t]), logits[:, t], rtol=1e-5, atol=1e-5)
        index = torch.tensor([streams - 1, 0, 0])  # reversed, a stream repeated: what a beam search does
        step.reorder(index)
        ahead, _ = model(x[index])
        into = torch.empty(3, V)
        assert step(x[index, 4], out=into) is into
        torch.testing.assert_close(into, ahead[:, 4], rtol=1e-5, atol=1e-5)


def test_generate_shapes_and_restores_mode():
    model = make("lstm").train()
    out = generate(model, ids(3, 4), 9, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 9)
    assert out.min() >= 0 and out.max() < V
    assert model.training


def test_pick_next_greedy_and_top_k():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, -1.0]])
    assert pick_next(logits, 0, 0, None).tolist() == [1, 0]
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        assert pick_next(logits, 5.0, 1, gen).tolist() == [1, 0]


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="cuda"):
            resolve_device("cuda")


def test_dropout_drops_the_asked_fraction_and_rescales():
    torch.manual_seed(0)
    x = torch.ones(400, 1000)
    for p in (0.1, 0.5):
        y = dropout(x, p)
        assert abs((y == 0).float().mean().item() - p) < 0.005
        zero, kept = y.unique().tolist()
        assert zero == 0.0 and kept == pytest.approx(1 / (1 - p))
    torch.manual_seed(1)
    a = dropout(x, 0.3)
    torch.manual_seed(1)
    assert torch.equal(a, dropout(x, 0.3)) and not torch.equal(a, dropout(x, 0.3))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_training_forward_with_dropout_is_the_module_layer_by_layer(cell, monkeypatch):
    """In training on the CPU the layers run one at a time with our dropout between them: with the masks made
    all-ones, that is exactly the recurrent module's own forward, state included, and gradients reach every weight."""
    import charrnn.model

    monkeypatch.setattr(charrnn.model, "dropout", lambda x, p: x)
    torch.manual_seed(0)
    model = CharRNN(ModelArgs(vocab_size=11, cell=cell, embed_size=6, hidden_size=10, num_layers=3, dropout=0.4))
    x = torch.randint(0, 11, (4, 7))
    state = tuple(torch.randn(3, 4, 10) for _ in model.init_state(4))
    model.train()
    logits, new = model(x, state)
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    with torch.no_grad():
        ref_logits, ref_new = model(x, state)
    assert torch.allclose(logits, ref_logits, atol=1e-6)
    assert len(new) == len(ref_new) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(new, ref_new))
