"""Session turns on the real tokenizer and chat template, with a real SQLite store (no Ray)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from deployments.errors import ConflictError, ContextLengthExceeded, NotFoundError
from deployments.sessions.manager import SessionManager
from deployments.sessions.sqlite import SQLiteSessionStore
from deployments.templating import ChatTemplate

OWNER = "key_a"


def make_manager(tmp_path: Path, tokenizer: Any, max_model_len: int = 2048) -> SessionManager:
    return SessionManager(
        SQLiteSessionStore(str(tmp_path / "s.sqlite3"), idle_ttl_s=None),
        ChatTemplate(tokenizer),
        max_model_len=max_model_len,
        max_sessions_per_owner=10,
        turn_timeout_s=60,
    )


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def run_turn(
    manager: SessionManager,
    session_id: str,
    text: str,
    reply_ids: list[int],
    tokenizer: Any,
    max_tokens: int = 16,
) -> Any:
    plan = await manager.begin(
        OWNER, session_id, user(text), requested_max_tokens=max_tokens, default_max_tokens=16
    )
    state = await manager.commit(plan, reply_ids, tokenizer.decode(reply_ids), is_exact=True)
    return plan, state


def test_each_turn_prompt_starts_with_the_previous_turns_exact_tokens(
    tmp_path: Path, tokenizer: Any
) -> None:
    async def main() -> None:
        manager = make_manager(tmp_path, tokenizer)
        state = await manager.create(OWNER, "m", system_prompt="Be brief.", tools=None, metadata={})
        previous: list[int] = []
        # Replies whose ids differ from how their text would re-tokenize: only exact-id continuation keeps them.
        replies = [[61, 75], [383, 88, 12], [500, 501, 502], [7], [71, 73]]
        for turn, reply in enumerate(replies):
            plan, saved = await run_turn(
                manager, state.session_id, f"question {turn}", reply, tokenizer
            )
            assert plan.prompt_token_ids[: len(previous)] == previous
            assert plan.is_prefix_continued == (turn > 0)
            previous = plan.prompt_token_ids + reply
            assert saved.token_ids == previous
        assert manager.counters.num_template_breaks == 0
        assert saved.num_turns == 5 and len(saved.messages) == 10

    asyncio.run(main())


def test_first_turn_prompt_equals_the_templates_own_rendering(
    tmp_path: Path, tokenizer: Any
) -> None:
    async def main() -> None:
        manager = make_manager(tmp_path, tokenizer)
        state = await manager.create(OWNER, "m", system_prompt="S", tools=None, metadata={})
        plan = await manager.begin(
            OWNER, state.session_id, user("hi"), requested_max_tokens=4, default_max_tokens=4
        )
        expected = tokenizer.apply_chat_template(
            [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}],
            add_generation_prompt=True,
            return_dict=False,
        )
        assert plan.prompt_token_ids == list(expected)
        assert (
            plan.retention is not None
            and plan.retention.start == 0
            and plan.retention.priority == 100
        )
        await manager.abort(plan)

    asyncio.run(main())


def test_a_template_that_renders_history_differently_is_detected_and_rerendered(
    tmp_path: Path, tokenizer: Any
) -> None:
    async def main() -> None:
        manager = make_manager(tmp_path, tokenizer)
        state = await manager.create(OWNER, "m", system_prompt=None, tools=None, metadata={})
        await run_turn(manager, state.session_id, "one", [72, 101], tokenizer)
        stored = await manager.get(OWNER, state.session_id)
        stored.prompt_text = stored.prompt_text.replace(
            "one", "uno"
        )  # what a history-rewriting template does
        await manager._store.save(stored)
        plan, _ = await run_turn(manager, state.session_id, "two", [5], tokenizer)
        assert not plan.is_prefix_continued
        assert manager.counters.num_template_breaks == 1

    asyncio.run(main())


def test_context_overflow_evicts_oldest_turns_and_reports_them(
    tmp_path: Path, tokenizer: Any
) -> None:
    async def main() -> None:
        manager = make_manager(tmp_path, tokenizer, max_model_len=160)
        state = await manager.create(OWNER, "m", system_prompt="Keep me.", tools=None, metadata={})
        for turn in range(3):
            await run_turn(
                manager, state.session_id, f"message number {turn} " * 3, [72, 101, 108], tokenizer
            )
        history = (await manager.get(OWNER, state.session_id)).messages
        assert len(history) == 6, "three turns fit without eviction"
        plan = await manager.begin(
            OWNER,
            state.session_id,
            user("the current question"),
            requested_max_tokens=40,
            default_max_tokens=16,
        )
        assert plan.evicted, "something had to go"
        assert [m["role"] for m in plan.evicted] == ["user", "assistant"] * (len(plan.evicted) // 2)
        assert plan.evicted == history[: len(plan.evicted)], "oldest first"
        text = tokenizer.decode(plan.prompt_token_ids)
        assert "Keep me." in text and "the current question" in text
        assert len(plan.prompt_token_ids) + 40 <= 160
        saved = await manager.commit(plan, [72], "H", is_exact=True)
        assert saved.evictions[-1].num_messages == len(plan.evicted)
        assert saved.evictions[-1].num_tokens_freed > 0

    asyncio.run(main())


def test_a_turn_that_cannot_fit_is_refused_and_history_is_kept(
    tmp_path: Path, tokenizer: Any
) -> None:
    async def main() -> None:
        manager = make_manager(tmp_path, tokenizer, max_model_len=64)
        state = await manager.create(OWNER, "m", system_prompt=None, tools=None, metadata={})
        await run_turn(manager, state.session_id, "short", [72], tokenizer, max_tokens=4)
        before = await manager.get(OWNER, state.session_id)
        with pytest.raises(ContextLengthExceeded) as raised:
            await manager.begin(
                OWNER,
                state.session_id,
                user("x " * 80),
                requested_max_tokens=8,
                default_max_tokens=8,
            )
        assert raised.value.code == "context_length_exceeded"
        after = await manager.get(OWNER, state.session_id)
        assert after.messages == before.messages and after.token_ids == before.token_ids
        # The failed turn released the session: the next one may start.
        plan = await manager.begin(
            OWNER, state.session_id, user("ok"), requested_max_tokens=4, default_max_tokens=4
        )
        await manager.abort(plan)

    asyncio.run(main())


def test_second_concurrent_turn_conflicts_and_abort_keeps_history(
    tmp_path: Path, tokenizer: Any
) -> None:
    async def main() -> None:
        manager = make_manager(tmp_path, tokenizer)
        state = await manager.create(OWNER, "m", system_prompt=None, tools=None, metadata={})
        plan = await manager.begin(
            OWNER, state.session_id, user("a"), requested_max_tokens=4, default_max_tokens=4
        )
        with pytest.raises(ConflictError):
            await manager.begin(
                OWNER, state.session_id, user("b"), requested_max_tokens=4, default_max_tokens=4
            )
        await manager.abort(plan)
        stored = await manager.get(OWNER, state.session_id)
        assert stored.messages == [] and stored.num_turns == 0

    asyncio.run(main())


def test_other_owners_cannot_see_or_delete_a_session(tmp_path: Path, tokenizer: Any) -> None:
    async def main() -> None:
        manager = make_manager(tmp_path, tokenizer)
        state = await manager.create(OWNER, "m", system_prompt=None, tools=None, metadata={})
        with pytest.raises(NotFoundError):
            await manager.get("key_b", state.session_id)
        with pytest.raises(NotFoundError):
            await manager.delete("key_b", state.session_id)
        assert (await manager.get(OWNER, state.session_id)).session_id == state.session_id

    asyncio.run(main())


def invalid_utf8_ids(tokenizer: Any, count: int) -> list[int]:
    """Token ids of bytes that are not UTF-8 (byte-level BPE's 0xFF): they decode to U+FFFD each."""
    return [tokenizer.convert_tokens_to_ids("ÿ")] * count


def test_a_reply_with_bytes_that_are_not_utf8_keeps_the_engines_exact_ids(
    tmp_path: Path, tokenizer: Any
) -> None:
    """U+FFFD in the text: the stored ids are still the generated ones (what the engine cached), and the
    next turn's prompt continues from them, not from a re-encoding of the text."""

    async def main() -> None:
        manager = make_manager(tmp_path, tokenizer)
        state = await manager.create(OWNER, "m", system_prompt=None, tools=None, metadata={})
        reply_ids = invalid_utf8_ids(tokenizer, 40) + [7]  # ... then "!"
        plan, saved = await run_turn(manager, state.session_id, "hi", reply_ids, tokenizer)
        assert "\ufffd" in saved.messages[-1]["content"]
        assert saved.token_ids == plan.prompt_token_ids + reply_ids
        # A re-encoding of the text is other ids: keeping them would miss the engine's cache.
        assert ChatTemplate(tokenizer).encode(saved.messages[-1]["content"]) != reply_ids
        following = await manager.begin(
            OWNER, state.session_id, user("next"), requested_max_tokens=8, default_max_tokens=8
        )
        assert following.prompt_token_ids[: len(saved.token_ids)] == saved.token_ids
        await manager.commit(following, [7], "!", is_exact=True)

    asyncio.run(main())


def test_an_eviction_never_reports_freeing_more_than_the_window(
    tmp_path: Path, tokenizer: Any
) -> None:
    async def main() -> None:
        manager = make_manager(tmp_path, tokenizer, max_model_len=256)
        state = await manager.create(OWNER, "m", system_prompt=None, tools=None, metadata={})
        plan = await manager.begin(
            OWNER, state.session_id, user("hi"), requested_max_tokens=200, default_max_tokens=16
        )
        # 200 generated bytes that are not UTF-8, cut by a stop string: the text kept re-encodes to about
        # three ids per U+FFFD, far more than the window holds.
        reply_ids = invalid_utf8_ids(tokenizer, 200)
        saved = await manager.commit(plan, reply_ids, tokenizer.decode(reply_ids), is_exact=False)
        assert len(saved.token_ids) > 256
        plan = await manager.begin(
            OWNER, state.session_id, user("next"), requested_max_tokens=8, default_max_tokens=8
        )
        assert plan.evicted
        saved = await manager.commit(plan, [7], "!", is_exact=True)
        assert 0 < saved.evictions[-1].num_tokens_freed <= 256

    asyncio.run(main())


def test_a_session_is_refused_before_it_is_stored_when_its_system_prompt_leaves_no_room(
    tmp_path: Path, tokenizer: Any
) -> None:
    async def main() -> None:
        manager = make_manager(tmp_path, tokenizer, max_model_len=64)
        for system_prompt in (
            "word " * 60,
            "x" * 10_000_000,
        ):  # over the window; over any tokenization
            with pytest.raises(ContextLengthExceeded) as raised:
                await manager.create(
                    OWNER, "m", system_prompt=system_prompt, tools=None, metadata={}
                )
            assert raised.value.param == "system_prompt"
        assert await manager._store.count_for_owner(OWNER) == 0

    asyncio.run(main())


def test_a_turn_too_large_for_any_tokenization_is_refused_before_taking_the_lease(
    tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def main() -> None:
        manager = make_manager(tmp_path, tokenizer)
        state = await manager.create(OWNER, "m", system_prompt=None, tools=None, metadata={})

        def never(*_: Any, **__: Any) -> Any:
            raise AssertionError("tokenized a prompt that cannot fit")

        for name in ("render_prompt", "render_text", "encode", "encode_rendered"):
            monkeypatch.setattr(manager._chat_template, name, never, raising=False)
        with pytest.raises(ContextLengthExceeded):
            await manager.begin(
                OWNER,
                state.session_id,
                user("x" * 5_000_000),
                requested_max_tokens=4,
                default_max_tokens=4,
            )
        assert await manager._store.acquire_turn(state.session_id, ttl_s=1) is not None

    asyncio.run(main())


def test_a_running_turn_keeps_its_lease_and_a_dead_routers_lease_is_taken_over(
    tmp_path: Path, tokenizer: Any
) -> None:
    """Two managers on one store file are two router replicas; `close()` without a release is a crash."""

    def replica(name: str) -> SessionManager:
        return SessionManager(
            SQLiteSessionStore(str(tmp_path / "s.sqlite3"), idle_ttl_s=None),
            ChatTemplate(tokenizer),
            max_model_len=2048,
            max_sessions_per_owner=10,
            turn_timeout_s=60,
            lease_ttl_s=0.3,
            holder=name,
        )

    async def main() -> None:
        router_a, router_b = replica("router-a"), replica("router-b")
        state = await router_a.create(OWNER, "m", system_prompt=None, tools=None, metadata={})
        plan = await router_a.begin(
            OWNER,
            state.session_id,
            user("a long turn"),
            requested_max_tokens=4,
            default_max_tokens=4,
        )
        await asyncio.sleep(1.0)  # over three TTLs: the heartbeat renewed it
        with pytest.raises(ConflictError):
            await router_b.begin(
                OWNER, state.session_id, user("b"), requested_max_tokens=4, default_max_tokens=4
            )
        await router_a.commit(plan, [7], "!", is_exact=True)

        await router_a.begin(
            OWNER,
            state.session_id,
            user("cut by a crash"),
            requested_max_tokens=4,
            default_max_tokens=4,
        )
        await router_a.close()  # router A dies: no release, no more renewals
        crashed_at = asyncio.get_running_loop().time()
        while True:
            try:
                plan = await router_b.begin(
                    OWNER, state.session_id, user("b"), requested_max_tokens=4, default_max_tokens=4
                )
                break
            except ConflictError:
                assert asyncio.get_running_loop().time() - crashed_at < 5, (
                    "the lease outlived its TTL"
                )
                await asyncio.sleep(0.05)
        saved = await router_b.commit(plan, [7], "!", is_exact=True)
        assert [m["content"] for m in saved.messages if m["role"] == "user"] == ["a long turn", "b"]
        await router_b.close()

    asyncio.run(main())
