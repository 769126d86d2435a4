"""Checks every recurrent token mixer with a chunked training path shares (tests/test_deltanet.py,
tests/test_mamba2.py): decode with a state equals the full forward, static and dynamic generate agree,
a tiny model learns, and bf16 autocast keeps the core's state in fp32."""
import torch


def assert_decode_equals_forward(model, vocab: int = 64):
    """Token by token, and prefilled in chunks of 5 (the last one shorter), to 1e-4."""
    idx = torch.randint(0, vocab, (2, 21))
    with torch.no_grad():
        full = model(idx)
        states, steps = model.init_state(2), []
        for t in range(idx.shape[1]):
            logits, states = model(idx[:, t:t + 1], states=states)
            steps.append(logits)
        chunks, states = [], model.init_state(2)
        for t in range(0, idx.shape[1], 5):
            logits, states = model(idx[:, t:t + 5], states=states)
            chunks.append(logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.cat(chunks, 1), full, atol=1e-4, rtol=1e-4)


def assert_static_generate_equals_dynamic(model, vocab: int = 64):
    assert model.supports_static()
    prompt = torch.randint(0, vocab, (1, 9))
    static = model.generate(prompt, 12, temperature=0.0, static=True)
    assert torch.equal(static, model.generate(prompt, 12, temperature=0.0, static=False))


def assert_learns(model, steps: int = 40):
    """AdamW on a sequence it can learn to continue: the loss ends below 0.3x its start."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.arange(64).repeat(4)[None, :129].repeat(4, 1)
    losses = []
    for _ in range(steps):
        loss = model(data[:, :-1], data[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses


def assert_bf16_keeps_the_state_fp32(block, state_field: str, d_model: int = 32):
    """Under bf16 autocast the block's output is bf16, its state fp32, and close to the fp32 output."""
    x = torch.randn(2, 19, d_model)
    ref, _ = block(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = block(x, block.init_state(2))
    assert y.dtype == torch.bfloat16 and getattr(state, state_field).dtype == torch.float32
    torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=5e-2)
