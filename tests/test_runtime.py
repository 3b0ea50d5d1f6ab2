"""Process-wide runtime settings the CLI applies at start-up."""


def test_cli_keeps_freed_memory_unless_told_not_to(monkeypatch):
    from retrieval import runtime

    calls = []
    monkeypatch.setattr(runtime, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.delenv("VTR_KEEP_FREED_MEMORY", raising=False)
    runtime.apply_cli_defaults()
    monkeypatch.setenv("VTR_KEEP_FREED_MEMORY", "0")
    runtime.apply_cli_defaults()
    assert calls == [1]
