"""The tolerance table itself: every row has a reason, looser on a GPU than on CPU, missing rows fail loudly."""
import pytest
import torch
from tolerances import TABLE, tol


def test_every_row_has_a_reason_and_positive_tolerances():
    for key, (rtol, atol, why) in TABLE.items():
        assert (rtol > 0 and atol > 0) or (rtol == atol == 0 and "exact" in why), key  # 0: bitwise, said so
        assert len(why) > 20, f"{key}: say why it is this loose"


def test_gpu_rows_are_never_tighter_than_cpu_rows():
    for (kind, dtype, dev), (rtol, atol, _) in TABLE.items():
        if dev == "cuda" and (kind, dtype, "cpu") in TABLE:
            cpu_rtol, cpu_atol, _ = TABLE[(kind, dtype, "cpu")]
            assert rtol >= cpu_rtol and atol >= cpu_atol, (kind, dtype)


def test_lookup_by_device_and_missing_rows():
    assert tol(torch.float32, "cpu") == dict(rtol=1e-5, atol=1e-5)
    assert tol(torch.bfloat16, torch.device("cuda"), "grad") == dict(rtol=5e-2, atol=5e-2)
    with pytest.raises(KeyError, match="add a row"):
        tol(torch.int32, "cpu")
