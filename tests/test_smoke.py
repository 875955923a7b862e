def test_kernel_runs_in_sandbox(kernel):
    assert kernel.value("__import__('os').getpid()") == 2
