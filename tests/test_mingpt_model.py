"""minGPT-ddp's model and data, in this process: causality, weight tying, generation,
the train/validation split and how batches are shared out among ranks."""
import pytest
import torch


def tiny_gpt(mingpt, vocab_size=50, block_size=16, dropout=0.0):
    torch.manual_seed(0)
    cfg = mingpt.model.ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, dropout=dropout)
    return mingpt.model.GPT(cfg, vocab_size).eval()


def test_a_token_cannot_see_the_future(mingpt):
    model = tiny_gpt(mingpt)
    tokens = torch.randint(50, (2, 16), generator=torch.Generator().manual_seed(1))
    changed_future = tokens.clone()
    changed_future[:, 8:] = (tokens[:, 8:] + 1) % 50
    with torch.no_grad():
        logits, _ = model(tokens)
        logits_future_changed, _ = model(changed_future)
    # Positions 0..7 predict from tokens 0..7 only: changing tokens 8.. must not move them.
    torch.testing.assert_close(logits[:, :8], logits_future_changed[:, :8], rtol=0, atol=1e-6)
    # ...while from position 8 on the model does read its inputs (else the check above is empty).
    assert (logits[:, 8:] - logits_future_changed[:, 8:]).abs().amax() > 1e-3


def test_gradient_of_a_prediction_reaches_only_past_tokens(mingpt):
    model = tiny_gpt(mingpt)
    tokens = torch.randint(50, (1, 16), generator=torch.Generator().manual_seed(2))
    embeddings = model.token_embedding(tokens).detach().requires_grad_(True)
    positions = model.position_embedding(torch.arange(16))
    x = embeddings + positions
    for block in model.blocks:
        x = block(x)
    x[0, 5].sum().backward()  # the hidden state at position 5
    per_position = embeddings.grad[0].abs().sum(dim=-1)
    assert per_position[6:].max() == 0  # no gradient from the future
    assert per_position[:6].min() > 0  # every past position contributes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_is_float32_when_the_weights_compute_in_half_precision(mingpt, dtype):
    """FSDP's MixedPrecisionPolicy runs the whole forward with bf16/fp16 weights and no autocast.
    A loss in that dtype is rounded (bf16 keeps 3 significant digits: 0.0156 apart near 3), and in
    fp16 the gradient scaler's first scale, 65536, times the loss is past fp16's largest number
    (65504): every first step would overflow and be skipped. So the loss is computed in float32,
    and its gradient stays finite."""
    model = tiny_gpt(mingpt).train().to(dtype)
    tokens = torch.randint(50, (2, 16), generator=torch.Generator().manual_seed(3))
    logits, loss = model(tokens, tokens.roll(-1, dims=1))
    assert logits.dtype == dtype and loss.dtype == torch.float32
    (loss * 65536.0).backward()  # what GradScaler(init_scale=65536).scale(loss).backward() does
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_weight_tying_init_and_generate(mingpt):
    model = tiny_gpt(mingpt, block_size=8)
    assert model.lm_head.weight is model.token_embedding.weight
    # the state dict names the shared matrix twice (embedding and head); the count has it once
    assert sum(t.numel() for t in model.state_dict().values()) == model.num_params() + 50 * 32
    # residual projections start smaller than the other matrices (GPT-2 init)
    assert model.blocks[0].attn.proj.weight.std() < 0.7 * model.blocks[0].attn.qkv.weight.std()
    prompt = torch.tensor([[1, 2, 3]])
    out = model.generate(prompt, max_new_tokens=20, generator=torch.Generator().manual_seed(0))  # > block_size
    assert out.shape == (1, 23) and torch.equal(out[:, :3], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < 50


def write_text(tmp_path, text):
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_split_is_contiguous_and_vocabulary_sorted(mingpt, tmp_path):
    cd = mingpt.char_dataset
    text = "".join(chr(ord("a") + (i * 7) % 26) for i in range(2000)) + "é\r\n"
    data = cd.CharData(cd.DataConfig(path=write_text(tmp_path, text), train_fraction=0.9), block_size=8)
    text = text.replace("\r\n", "\n")
    assert data.vocab.chars == "".join(sorted(set(text)))
    assert data.vocab.decode(data.train.tolist()) == text[:int(0.9 * len(text))]
    assert data.vocab.decode(data.val.tolist()) == text[int(0.9 * len(text)):]
    # Training windows come from the training text only, validation windows from the rest.
    train_text, val_text = text[:int(0.9 * len(text))], text[int(0.9 * len(text)):]
    for step in range(20):
        x, y = data.train_batch(step, seed=0, batch_size=16, micro_step=0, grad_accum_steps=1, rank=0, world_size=1)
        for row_x, row_y in zip(x.tolist(), y.tolist()):
            assert data.vocab.decode(row_x) + data.vocab.decode(row_y)[-1:] in train_text
    for x, _ in data.val_batches(5, 16, seed=0, rank=0, world_size=1):
        assert all(data.vocab.decode(row) in val_text for row in x.tolist())


def test_default_corpus_is_deterministic_and_offline(mingpt):
    cd = mingpt.char_dataset
    first, second = cd.CharData(cd.DataConfig(), 64), cd.CharData(cd.DataConfig(), 64)
    assert first.fingerprint() == second.fingerprint()
    assert len(first.train) + len(first.val) > 1_000_000 and len(first.vocab) < 128


def test_ranks_share_out_one_global_batch(mingpt, tmp_path):
    cd = mingpt.char_dataset
    data = cd.CharData(cd.DataConfig(path=write_text(tmp_path, "abcdefghij" * 300)), block_size=8)

    def batch(**where):
        return data.train_batch(7, seed=3, batch_size=4, **where)[0]

    two_ranks = [batch(micro_step=0, grad_accum_steps=1, rank=r, world_size=2) for r in (0, 1)]
    one_rank_two_micro = [batch(micro_step=m, grad_accum_steps=2, rank=0, world_size=1) for m in (0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(two_ranks, one_rank_two_micro))
    assert not torch.equal(two_ranks[0], two_ranks[1])  # ranks train on different windows
    # validation: batch i goes to rank i % world_size, together exactly the 1-rank set
    one = [x for x, _ in data.val_batches(5, 4, seed=0, rank=0, world_size=1)]
    shares = [[x for x, _ in data.val_batches(5, 4, seed=0, rank=r, world_size=2)] for r in (0, 1)]
    assert [len(s) for s in shares] == [3, 2]
    assert all(torch.equal(a, b) for a, b in zip(one[0::2], shares[0]))
    assert all(torch.equal(a, b) for a, b in zip(one[1::2], shares[1]))
