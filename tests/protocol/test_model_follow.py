"""A device following the model: the announced patch from the model it holds, else the full file.
Every refusal falls back to the full model and is counted by its reason; nothing unverified is held."""
from __future__ import annotations

import pytest

from pqsu.protocol import chunking, model_id
from pqsu.protocol.model_follow import HELD, NOT_ANNOUNCED, ModelFollower, offers_of, wire_bytes
from pqsu.protocol.patch import make_patch
from tests.protocol.test_patch import W, example_pair, tiny_model

LIMIT = 128 * 1024


@pytest.fixture
def chain():
    """A, B (the docs' worked example) and C, a model that is not patchable from A."""
    a, b = example_pair()
    c = tiny_model(W[::-1].copy(), extra='{"round": 7}')
    return model_id.verified(a), model_id.verified(b), model_id.verified(c)


def follow(follower, target, patches, full, limit=LIMIT):
    return follower.follow(target.model_id, offers_of(patches), patches.__getitem__, lambda: full.data, limit)


def test_a_device_holding_the_base_takes_the_patch_and_holds_the_target_byte_for_byte(chain):
    a, b, _ = chain
    patch = make_patch(a.data, b.data)
    f = ModelFollower(a)
    file, how = follow(f, b, {a.model_id: patch}, b)
    assert file.data == b.data and f.held_id == b.model_id
    assert (how.kind, how.nbytes, how.first) == ("patch", len(patch) + chunking.HEADER_SIZE, False)
    assert follow(f, b, {a.model_id: patch}, b)[1] == HELD  # already held: nothing downloaded
    assert not f.refusals


def test_a_device_without_a_model_or_with_another_base_downloads_the_full_file(chain):
    a, b, c = chain
    patches = {a.model_id: make_patch(a.data, b.data)}
    fresh = ModelFollower()
    assert follow(fresh, b, patches, b)[1].to_dict() == {"kind": "full", "bytes": len(b) + 69, "first": True}
    behind = ModelFollower(c)  # holds a model no patch is offered from
    assert follow(behind, b, patches, b)[1].to_dict() == {"kind": "full", "bytes": len(b) + 69, "first": False}
    assert not fresh.refusals and not behind.refusals


def corrupt(patch: bytes) -> bytes:
    return patch[:100] + bytes([patch[100] ^ 1]) + patch[101:]  # in the first op


# (what happens to the patch on its way, the reason it is refused for)
CASES = {
    "corrupt": (corrupt, "bad-checksum"),
    "cut": (lambda p: p[:-7], "bad-checksum"),
    "truncated": (lambda p: p[:50], "truncated"),  # not even a header
    "not-a-patch": (lambda p: b"\x08\x07" + p[2:], "bad-magic"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_damaged_patch_is_refused_counted_and_the_full_model_taken(chain, case):
    """Announced with the damaged bytes' own hash (a forger's announcement): the patch is judged by
    apply_patch, not by the announcement."""
    a, b, _ = chain
    damage, reason = CASES[case]
    bad = damage(make_patch(a.data, b.data))
    f = ModelFollower(a)
    file, how = follow(f, b, {a.model_id: bad}, b)
    assert file.data == b.data and how.kind == "full"
    assert how.nbytes == wire_bytes(len(bad), LIMIT) + wire_bytes(len(b), LIMIT)  # the refused patch counts too
    assert f.refusals == {reason: 1}


def test_a_patch_other_than_the_announced_one_is_refused(chain):
    a, b, _ = chain
    patch = make_patch(a.data, b.data)
    f = ModelFollower(a)
    offers = offers_of({a.model_id: patch})
    file, how = f.follow(b.model_id, offers, lambda base: corrupt(patch), lambda: b.data, LIMIT)
    assert file.data == b.data and how.kind == "full" and f.refusals == {NOT_ANNOUNCED: 1}


def test_a_patch_for_another_base_or_target_is_refused(chain):
    a, b, c = chain
    patch = make_patch(a.data, b.data)
    on_c = ModelFollower(c)  # offered the A->B patch under C's id: the patch names another base
    file, _ = follow(on_c, b, {c.model_id: patch}, b)
    assert file.data == b.data and on_c.refusals == {"wrong-base": 1}
    on_a = ModelFollower(a)  # the A->B patch announced for a round whose model is C
    file, _ = on_a.follow(c.model_id, offers_of({a.model_id: patch}), lambda base: patch, lambda: c.data, LIMIT)
    assert file.data == c.data and on_a.refusals == {"target-mismatch": 1}


def test_a_full_model_that_does_not_verify_is_never_held(chain):
    a, b, _ = chain
    f = ModelFollower(a)
    with pytest.raises(model_id.ModelIdError):
        follow(f, b, {}, model_id.VerifiedModel(b.data[:-1] + b"x", b.model_id))
    assert f.held is a
