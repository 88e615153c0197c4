"""The record of what a run was trained with, and the note on runs from different stacks."""

import json

import jax

from autocontext_jax.runtime import environment


def test_the_record_names_this_process_versions_and_devices(tmp_path):
    record = environment.append_environment(tmp_path, 7)
    assert environment.read_environments(tmp_path) == [record]
    assert record["start_step"] == 7
    assert record["packages"]["jax"] == jax.__version__
    assert record["backend"] == jax.default_backend()
    assert record["device_count"] == jax.device_count()
    assert record["devices"] == sorted({d.device_kind for d in jax.devices()})


def test_the_cpu_is_named_by_model_ids_and_vector_extensions(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    first = (
        "processor\t: 0\nvendor_id\t: X\ncpu family\t: 25\nmodel\t\t: 17\n"
        "model name\t: AMD EPYC\nstepping\t: 1\nflags\t\t: fpu avx2 sse4_2 avx512f fma ht\n"
    )
    cpuinfo.write_text(first + "\nprocessor\t: 1\nmodel name\t: Other\nflags\t\t: sse2\n")
    assert environment.cpu_identity(cpuinfo) == {
        "cpu": "AMD EPYC (cpu family 25, model 17, stepping 1)",
        "cpu_features": "avx2 avx512f fma sse4_2",
    }
    # Arm lists its extensions as Features, and some kernels give no ids.
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Neoverse\nFeatures\t: fp asimd sve atomics\n")
    assert environment.cpu_identity(cpuinfo) == {"cpu": "Neoverse", "cpu_features": "asimd sve"}
    missing = environment.cpu_identity(tmp_path / "missing")
    assert missing["cpu"]  # falls back to `platform`
    assert missing["cpu_features"] == ""


def test_two_cpus_of_one_name_with_other_vector_extensions_are_two_stacks(tmp_path):
    # A VM names Zen 3 and Zen 4 alike ("AMD EPYC"); only Zen 4 has AVX-512, whose kernels
    # sum in another order.
    record = environment.environment_record(0)
    runs = {
        "zen3": _run(tmp_path, "zen3", cpu="AMD EPYC", cpu_features="avx avx2 fma"),
        "zen4": _run(tmp_path, "zen4", cpu="AMD EPYC", cpu_features="avx avx2 avx512f fma"),
    }
    assert "2 different software/hardware stacks" in environment.mixed_stacks_note(runs)
    moved = {**record, "cpu_features": record["cpu_features"] + " amx_tile"}
    assert "cpu_features: " in environment.resume_note([record], moved)


def _run(tmp_path, name, **changes):
    workdir = tmp_path / name
    workdir.mkdir()
    record = {**environment.environment_record(0), **changes}
    (workdir / environment.ENVIRONMENT_FILE).write_text(json.dumps(record) + "\n")
    return workdir


def test_runs_of_one_stack_get_no_note_whatever_their_host_and_time(tmp_path):
    runs = {
        "a": _run(tmp_path, "a"),
        "b": _run(tmp_path, "b", host="other-node", time="2020-01-01T00:00:00+00:00"),
    }
    assert environment.mixed_stacks_note(runs) is None


def test_runs_of_different_cpus_or_versions_are_named_by_stack(tmp_path):
    record = environment.environment_record(0)
    runs = {
        "a": _run(tmp_path, "a"),
        "b": _run(tmp_path, "b", cpu="Another CPU"),
        "c": _run(tmp_path, "c", packages={**record["packages"], "jaxlib": "0.0.1"}),
        "d": _run(tmp_path, "d"),
    }
    note = environment.mixed_stacks_note(runs)
    assert note.startswith("Runs trained on 3 different software/hardware stacks")
    assert ": a, d | b | c;" in note


def test_a_run_resumed_on_another_stack_differs_from_one_that_was_not(tmp_path):
    resumed = _run(tmp_path, "resumed")
    with open(resumed / environment.ENVIRONMENT_FILE, "a") as f:
        f.write(json.dumps({**environment.environment_record(4), "cpu": "Another CPU"}) + "\n")
    note = environment.mixed_stacks_note({"plain": _run(tmp_path, "plain"), "resumed": resumed})
    assert note is not None and "plain | resumed" in note


def test_runs_without_a_record_are_named_only_beside_runs_with_one(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    assert environment.mixed_stacks_note({"old": old}) is None
    note = environment.mixed_stacks_note({"new": _run(tmp_path, "new"), "old": old})
    assert note == f"No {environment.ENVIRONMENT_FILE} in old: their stack is unknown."


def test_a_resume_on_another_stack_says_what_changed():
    before = environment.environment_record(0)
    same = {**environment.environment_record(6), "host": "other-node"}
    assert environment.resume_note([], before) is None
    assert environment.resume_note([before], same) is None
    moved = {**same, "cpu": "Another CPU", "packages": {**same["packages"], "jaxlib": "0.0.1"}}
    note = environment.resume_note([before], moved)
    assert f"cpu: {before['cpu']} -> Another CPU" in note
    assert f"jaxlib: {before['packages']['jaxlib']} -> 0.0.1" in note
    assert "from step 6 on" in note


def test_the_record_keeps_the_resolved_lowering_and_a_resume_says_when_it_changed(tmp_path):
    lowering = {"conv_impl": "depth_folded", "conv_impl_how": "cached", "conv_impl_seconds": {}}
    before = environment.append_environment(tmp_path, 0, lowering)
    assert environment.read_environments(tmp_path)[0]["conv_impl"] == "depth_folded"
    after = {**environment.environment_record(5), "conv_impl": "folded_ynnpack"}
    note = environment.resume_note([before], after)
    assert "conv_impl: depth_folded -> folded_ynnpack" in note
    # A record written before the lowering was kept does not count as a change.
    older = {key: value for key, value in before.items() if not key.startswith("conv_impl")}
    assert environment.resume_note([older], after) is None


def test_a_torn_line_loses_that_record_and_not_the_run(tmp_path):
    first = environment.append_environment(tmp_path, 0)
    with open(tmp_path / environment.ENVIRONMENT_FILE, "a") as f:
        f.write('{"start_step": 2, "cpu": "A')  # as if killed while writing
    assert environment.read_environments(tmp_path) == [first]
    second = environment.append_environment(tmp_path, 4)
    assert environment.read_environments(tmp_path) == [first, second]
