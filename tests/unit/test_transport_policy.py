from __future__ import annotations

import random
from collections import Counter
from typing import Any

from deployments.executors import trtllm_kv_events
from deployments.transport.policy import (
    PrefixIndex,
    ReplicaLoad,
    RoutingConfig,
    RoutingPolicy,
    chain_block_hashes,
)

BLOCK = 4
REPLICAS = ["r0", "r1", "r2", "r3"]


def policy(seed: int = 0, **config: Any) -> RoutingPolicy:
    return RoutingPolicy(RoutingConfig(block_size=BLOCK, **config), rng=random.Random(seed))


def loads(
    ongoing: dict[str, int] | None = None, ids: list[str] = REPLICAS, limit: int = 100
) -> list[ReplicaLoad]:
    ongoing = ongoing or {}
    return [ReplicaLoad(i, ongoing.get(i, 0), limit) for i in ids]


def owner(p: RoutingPolicy, replicas: list[ReplicaLoad], session_id: str) -> str:
    ranks = p.rank(replicas, session_id=session_id, prompt_token_ids=[])
    assert all(len(rank) == 1 for rank in ranks)
    return ranks[0][0]


def owners(p: RoutingPolicy, ids: list[str], sessions: list[str]) -> dict[str, str]:
    return {sid: owner(p, loads(ids=ids), sid) for sid in sessions}


SESSIONS = [f"session-{i}" for i in range(400)]


# ---- sessions: consistent hashing with bounded load -------------------------------------------------------
def test_session_sticks_to_one_replica_across_calls() -> None:
    p = policy()
    busy = {"r0": 2, "r1": 1, "r2": 0, "r3": 1}  # uneven, but nobody above the bound
    chosen = {owner(p, loads(busy), "chat-42") for _ in range(5)}
    chosen.add(
        owner(policy(seed=7), loads(), "chat-42")
    )  # another router process: same ring, same owner
    assert len(chosen) == 1


def test_sessions_spread_over_every_replica() -> None:
    counts = Counter(owners(policy(), REPLICAS, SESSIONS).values())
    assert set(counts) == set(REPLICAS)
    assert max(counts.values()) < 2 * len(SESSIONS) / len(REPLICAS)


def test_every_replica_is_ranked_once_in_ring_order() -> None:
    p = policy()
    ranks = p.rank(loads(), session_id="s", prompt_token_ids=[])
    assert [rank[0] for rank in ranks] == p.session_order(REPLICAS, "s")
    assert sorted(rank[0] for rank in ranks) == REPLICAS


def test_bounded_load_falls_back_clockwise_and_returns_when_owner_frees() -> None:
    p = policy(load_epsilon=0.25, load_slack=0)
    first, second = p.session_order(REPLICAS, "s")[:2]
    others = {r: 1 for r in REPLICAS}
    # capacity = ceil(1.25 * (ongoing + 1) / 4) = ceil(1.25 * 8 / 4) = 3 < 4: the owner is skipped.
    assert owner(p, loads({**others, first: 4}), "s") == second
    ranks = p.rank(loads({**others, first: 4}), session_id="s", prompt_token_ids=[])
    assert ranks[-1] == [first]  # still listed, last, for when this router's load view is stale
    assert owner(p, loads({**others, first: 1}), "s") == first  # ceil(1.25 * 5 / 4) = 2 > 1
    assert owner(p, loads({**others, first: 0}), "s") == first


def test_the_load_slack_keeps_a_lightly_loaded_owner_and_still_bounds_it() -> None:
    p = policy(load_epsilon=0.25, load_slack=3)
    first, second = p.session_order(REPLICAS, "s")[:2]
    others = {r: 1 for r in REPLICAS}
    # ceil(1.25 * 8 / 4) = 3, but never below ceil(8 / 4) + 3 = 5: an owner with 4 keeps the session.
    assert owner(p, loads({**others, first: 4}), "s") == first
    # ceil(10 / 4) + 3 = 6: an owner holding 6 is past even the slack.
    assert owner(p, loads({**others, first: 6}), "s") == second
    # Under heavy load the epsilon bound is the larger one: ceil(1.25 * 431 / 4) = 135 > 108 + 3,
    # and ceil(1.25 * 441 / 4) = 138.
    heavy = {r: 100 for r in REPLICAS}
    assert owner(p, loads({**heavy, first: 130}, limit=1000), "s") == first
    assert owner(p, loads({**heavy, first: 140}, limit=1000), "s") == second


def test_first_pass_offers_a_session_only_its_first_fitting_replica() -> None:
    p = policy(load_slack=0)
    first, second = p.session_order(REPLICAS, "s")[:2]
    assert p.rank(loads(), session_id="s", prompt_token_ids=[], is_first_pass=True) == [[first]]
    over = loads({first: 9})
    assert p.rank(over, session_id="s", prompt_token_ids=[], is_first_pass=True) == [[second]]
    sessionless = p.rank(loads(), session_id=None, prompt_token_ids=[], is_first_pass=True)
    assert len(sessionless) == 1 and len(sessionless[0]) == 2


def test_full_owner_is_skipped_even_under_the_bound() -> None:
    p = policy(load_epsilon=10.0)
    first, second = p.session_order(REPLICAS, "s")[:2]
    assert owner(p, loads({first: 2}, limit=2), "s") == second


def test_replica_leaving_moves_only_its_sessions() -> None:
    before = owners(policy(), REPLICAS, SESSIONS)
    after = owners(policy(), [r for r in REPLICAS if r != "r2"], SESSIONS)
    moved = {sid for sid in SESSIONS if before[sid] != after[sid]}
    assert moved == {sid for sid in SESSIONS if before[sid] == "r2"}


def test_replica_joining_takes_sessions_only_for_itself() -> None:
    before = owners(policy(), REPLICAS, SESSIONS)
    after = owners(policy(), [*REPLICAS, "r4"], SESSIONS)
    moved = [sid for sid in SESSIONS if before[sid] != after[sid]]
    assert moved and all(after[sid] == "r4" for sid in moved)
    assert len(moved) < 2 * len(SESSIONS) / (len(REPLICAS) + 1)


# ---- sessionless: longest cached prefix while balanced, else power of two ----------------------------------
SYSTEM = list(range(100, 108))  # two blocks
CHAT_A = SYSTEM + list(range(200, 212))  # five blocks, the first two shared


def test_chained_hash_same_prefix_same_hashes_and_one_changed_token_changes_all_later() -> None:
    base = list(range(40))
    assert (
        chain_block_hashes(base, BLOCK)[:3]
        == chain_block_hashes(base[:12] + [7, 7, 7, 7], BLOCK)[:3]
    )
    changed = base[:5] + [999] + base[6:]
    original, edited = chain_block_hashes(base, BLOCK), chain_block_hashes(changed, BLOCK)
    assert original[0] == edited[0]
    assert all(a != b for a, b in zip(original[1:], edited[1:], strict=True))
    assert len(chain_block_hashes(base[:11], BLOCK)) == 2  # the partial tail block is not hashed
    assert chain_block_hashes(base, BLOCK)[1:] == chain_block_hashes(
        base[4:], BLOCK, parent_hash=original[0]
    )


def test_block_hashes_match_the_engine_kv_event_hashes() -> None:
    tokens = list(range(1000, 1070))
    assert chain_block_hashes(tokens, 32) == trtllm_kv_events.chain_block_hashes(tokens, 32)


def test_sessionless_request_goes_to_the_longest_shared_prefix() -> None:
    p = policy()
    p.record_routed("r1", CHAT_A + [1])
    p.record_routed("r3", SYSTEM + [300, 301, 302, 303, 1])
    follow_up = CHAT_A + [5, 6, 7, 8, 9]
    assert p.rank(loads({"r1": 2}), session_id=None, prompt_token_ids=follow_up)[0] == ["r1"]
    ranks = p.rank(loads(), session_id=None, prompt_token_ids=SYSTEM + [400, 401, 402, 403, 1])
    assert ranks[0] == ["r1", "r3"]  # a tie: Serve takes the shorter queue of the two
    assert len(ranks) == 2 and len(ranks[1]) == 2  # then power of two choices


def test_no_shared_prefix_uses_power_of_two() -> None:
    p = policy()
    p.record_routed("r1", CHAT_A)
    ranks = p.rank(
        loads({"r0": 3, "r2": 1}), session_id=None, prompt_token_ids=list(range(500, 540))
    )
    assert len(ranks) == 1 and len(ranks[0]) == 2


def test_imbalance_falls_back_to_power_of_two_on_load() -> None:
    p = policy(imbalance_threshold=4)
    p.record_routed("r1", CHAT_A)
    ranks = p.rank(loads({"r1": 9}, ids=["r0", "r1"]), session_id=None, prompt_token_ids=CHAT_A)
    assert ranks == [["r0", "r1"]]  # least loaded first; r1's cached prefix is ignored
    assert p.rank(loads({"r1": 3}, ids=["r0", "r1"]), session_id=None, prompt_token_ids=CHAT_A)[
        0
    ] == ["r1"]


def test_power_of_two_is_seeded_and_skips_full_replicas() -> None:
    ids = [f"r{i}" for i in range(8)]
    replicas = loads({"r0": 2, "r1": 2, "r5": 1}, ids=ids, limit=2)

    def draws(seed: int) -> list[list[list[str]]]:
        p = policy(seed)
        return [p.rank(replicas, session_id=None, prompt_token_ids=[]) for _ in range(20)]

    assert draws(3) == draws(3)
    pairs = [ranks[0] for ranks in draws(3)]
    assert all(len(pair) == 2 and not {"r0", "r1"} & set(pair) for pair in pairs)
    assert all(
        pair[1] == "r5" for pair in pairs if "r5" in pair
    )  # the less loaded of the two first


# ---- state ------------------------------------------------------------------------------------------------
def test_prefix_index_is_a_bounded_lru_that_keeps_leading_blocks() -> None:
    index = PrefixIndex(max_entries=4)
    old = chain_block_hashes(list(range(24)), BLOCK)
    new = chain_block_hashes(list(range(50, 74)), BLOCK)
    index.insert(old)
    index.insert(new)
    assert len(index) == 4
    assert index.match(new) == 4 and index.match(old) == 0


def test_departed_replicas_are_forgotten() -> None:
    p = policy()
    for replica_id in REPLICAS:
        p.record_routed(replica_id, CHAT_A)
    p.retain(["r0", "r1"])
    p.forget("r1")
    assert [p.num_prefix_entries(r) for r in REPLICAS] == [4, 0, 0, 0]


def test_power_of_two_policy_ignores_sessions_and_prefixes() -> None:
    p = policy(seed=3, is_affinity=False)
    replicas = loads()
    p.record_routed(REPLICAS[0], list(range(200)))
    ranks = p.rank(replicas, session_id=None, prompt_token_ids=list(range(200)))
    assert len(ranks) == 1 and len(ranks[0]) == 2  # two random candidates, no prefix rank
    seen = {tuple(p.rank(replicas, session_id="s", prompt_token_ids=[1])[0]) for _ in range(30)}
    assert len(seen) > 1  # a session does not pin a replica


def held(block_hashes: list[int]) -> dict[str, Any]:
    """A replica's routing stats when it reports its KV blocks (TensorRT-LLM's KV events)."""
    return {"kv_blocks": {"has_kv_events": True, "kv_block_hashes": block_hashes}}


def test_a_replica_that_reports_its_blocks_attracts_their_prefix_until_it_evicts_them() -> None:
    p = policy(seed=1)
    blocks = p.prompt_block_hashes(CHAT_A)
    p.observe("r2", held(blocks))
    p.record_routed("r1", CHAT_A)  # a prediction for a replica without events still counts
    p.record_routed("r2", list(range(500, 540)))  # ignored: r2 reports what it holds
    ranks = p.rank(loads(), session_id=None, prompt_token_ids=CHAT_A)
    assert sorted(ranks[0]) == ["r1", "r2"]
    p.observe("r2", held(blocks[:2]))  # the engine evicted the tail of the prefix
    assert p.rank(loads(), session_id=None, prompt_token_ids=CHAT_A)[0] == ["r1"]
    p.observe("r2", held([]))
    p.observe("r1", held([]))  # r1 turns out to hold nothing either: no prefix rank at all
    ranks = p.rank(loads(), session_id=None, prompt_token_ids=CHAT_A)
    assert len(ranks) == 1 and len(ranks[0]) == 2  # power of two choices only


def test_a_replica_without_kv_events_keeps_its_predicted_prefixes() -> None:
    p = policy()
    p.record_routed("r3", CHAT_A)
    p.observe("r3", {"kv_blocks": {"has_kv_events": False, "kv_block_hashes": []}})
    p.observe("r3", {})
    assert p.rank(loads(), session_id=None, prompt_token_ids=CHAT_A)[0] == ["r3"]


def test_a_session_turn_hashes_like_a_whole_prompt_whether_it_continues_or_breaks() -> None:
    incremental, whole = policy(), policy()
    turn_1 = list(range(100, 143))
    turn_2 = turn_1 + list(range(200, 230))  # continues turn 1
    broken = [7] + turn_2[1:]  # a template break or an eviction: the first block changed
    shorter = turn_1[:9]
    for prompt in (turn_1, turn_2, turn_2 + [1, 2, 3, 4, 5], broken, shorter, turn_2):
        incremental.record_routed("r1", prompt, "session-a")
        whole.record_routed("r1", prompt)
        assert incremental._session_block_hashes("session-b", prompt) == whole.prompt_block_hashes(
            prompt
        )
        # What the replica is predicted to hold is the same either way.
        probe = loads()
        for candidate in (turn_1, turn_2, broken):
            assert (
                incremental.rank(probe, session_id=None, prompt_token_ids=candidate)[0]
                == (whole.rank(probe, session_id=None, prompt_token_ids=candidate)[0])
            )
