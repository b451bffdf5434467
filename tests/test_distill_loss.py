"""The distillation loss: the fused path (loss and gradient in one pass over the frozen head) against the
checkpointed autograd path it replaces, with and without a bias and Gemma-2's soft-capping."""

import pytest
import torch
import torch.nn.functional as F

from flexicli.train.objectives import distill_loss, logits_fn


class _Model:  # what logits_fn reads: the output embeddings and the config
    def __init__(self, head, cap=None):
        self.head, self.config = head, type("C", (), {"final_logit_softcapping": cap})()

    def get_output_embeddings(self):
        return self.head


@pytest.mark.parametrize("bias,cap", [(False, None), (True, None), (False, 3.0)])
def test_fused_equals_autograd(bias, cap):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 97, bias=bias).requires_grad_(False)
    fn = logits_fn(_Model(head, cap))
    assert fn.linear is not None

    def plain(h):  # the same logits without `linear`: distill_loss takes the checkpointed path
        return fn(h)

    s0 = torch.randn(2, 13, 16) * 3
    t = s0 + torch.randn(2, 13, 16) * 2  # related: some tokens agree, some do not
    out = {}
    for name, f in (("fused", fn), ("autograd", plain)):
        s = s0.clone().requires_grad_()
        loss, agree = distill_loss(s, t, f, chunk=5)  # 26 tokens: the last chunk is short
        (2.5 * loss).backward()
        out[name] = (loss.item(), agree.item(), s.grad)
    (lf, af, gf), (la, aa, ga) = out["fused"], out["autograd"]
    assert lf == pytest.approx(la, rel=1e-5) and af == aa
    assert 0 < af < 1 and lf > 0.1  # far from the teacher: a real comparison
    torch.testing.assert_close(gf, ga, rtol=1e-4, atol=1e-6)


def test_kl_matches_its_definition():
    torch.manual_seed(1)
    head = torch.nn.Linear(8, 31, bias=False).requires_grad_(False)
    s, t = torch.randn(10, 8, requires_grad=True), torch.randn(10, 8)
    loss, agree = distill_loss(s, t, logits_fn(_Model(head)), chunk=4)
    want = F.kl_div(F.log_softmax(head(s), -1), F.log_softmax(head(t), -1), log_target=True, reduction="batchmean")
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert agree.item() == (head(s).argmax(-1) == head(t).argmax(-1)).float().mean().item()


def test_trainable_head_takes_the_autograd_path():
    head = torch.nn.Linear(8, 31)  # requires grad: the fused path has no gradient for it
    s, t = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8)
    loss, _ = distill_loss(s, t, logits_fn(_Model(head)), chunk=4)
    loss.backward()
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("fused", [True, False])
def test_token_weights_give_the_weighted_mean_and_its_gradient(fused):
    """Weighted KL, both paths, against the definition: sum_i w_i KL_i / sum_i w_i, and its gradient by autograd."""
    torch.manual_seed(2)
    head = torch.nn.Linear(8, 31, bias=False).requires_grad_(False)
    fn = logits_fn(_Model(head)) if fused else (lambda h: head(h).float())
    s0, t = torch.randn(2, 7, 8) * 2, torch.randn(2, 7, 8)
    w = torch.rand(2, 7) * 4 + 0.5
    s = s0.clone().requires_grad_()
    loss, agree = distill_loss(s, t, fn, chunk=3, weights=w)
    loss.backward()
    ref = s0.clone().requires_grad_()
    per_token = F.kl_div(F.log_softmax(head(ref), -1), F.log_softmax(head(t), -1), log_target=True,
                         reduction="none").sum(-1)
    want = (per_token * w).sum() / w.sum()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert loss.item() != pytest.approx(per_token.mean().item(), rel=1e-3)  # the weights change the figure
    torch.testing.assert_close(s.grad, ref.grad, rtol=1e-4, atol=1e-6)
    unweighted, _ = distill_loss(s0, t, fn, chunk=3, weights=torch.ones(2, 7))
    assert unweighted.item() == pytest.approx(per_token.mean().item(), rel=1e-5)


def test_token_weights_must_match_the_tokens():
    head = torch.nn.Linear(8, 31, bias=False).requires_grad_(False)
    with pytest.raises(RuntimeError, match="token weights"):
        distill_loss(torch.randn(2, 5, 8), torch.randn(2, 5, 8), logits_fn(_Model(head)), weights=torch.ones(2, 4))


@pytest.mark.parametrize("fused,cap,lead", [(True, None, 0.0), (False, None, 0.0), (True, 3.0, 0.0), (True, None, 0.3),
                                            (False, None, 0.3), (True, 3.0, 0.3)])
def test_top1_weight_adds_the_cross_entropy_on_the_misses(fused, cap, lead):
    """top1_weight: mean over tokens of KL + weight * CE(student, the teacher's top token) where the two top tokens
    differ (and, with top1_lead, where the student's top token is the teacher's by a logit gap under the lead), both
    paths, against the definition and its autograd gradient (with Gemma-2's soft-capping too)."""
    torch.manual_seed(7)
    head = torch.nn.Linear(8, 31, bias=False).requires_grad_(False)
    f = logits_fn(_Model(head, cap))
    fn = f if fused else (lambda h: f(h))
    s0 = torch.randn(3, 9, 8) * 2
    t = s0 + torch.randn(3, 9, 8) * 1.5
    w = torch.rand(3, 9) + 0.5
    s = s0.clone().requires_grad_()
    loss, agree = distill_loss(s, t, fn, chunk=4, weights=w, top1_weight=0.7, top1_lead=lead)
    loss.backward()
    ref = s0.clone().requires_grad_()
    ls, lt = F.log_softmax(f(ref), -1), F.log_softmax(f(t), -1)
    top = lt.argmax(-1)
    miss = ls.argmax(-1) != top
    assert 0 < miss.sum() < miss.numel()  # some tokens agree, some do not: both branches run
    two = ls.topk(2, dim=-1).values
    short = ~miss & (two[..., 0] - two[..., 1] < lead)  # matches by less than the lead
    assert short.any() == (lead > 0) and (~miss & ~short).any()  # with a lead: all three kinds of token
    term = miss | short
    per_token = (lt.exp() * (lt - ls)).sum(-1) - 0.7 * term * ls.gather(-1, top[..., None]).squeeze(-1)
    want = (per_token * w).sum() / w.sum()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert agree.item() == pytest.approx(1 - miss.float().mean().item())
    torch.testing.assert_close(s.grad, ref.grad, rtol=1e-4, atol=1e-6)
    plain, _ = distill_loss(s0, t, fn, chunk=4, weights=w)
    assert plain.item() < loss.item() - 1e-3  # the term is there
