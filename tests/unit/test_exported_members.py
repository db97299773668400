import deployments


def test_package_exports_only_build_app() -> None:
    assert deployments.__all__ == ["build_app"]
    assert callable(deployments.build_app)
