from tests import rabbitmq


def pytest_sessionfinish(session, exitstatus):
    # Leave nothing running: the node (and its epmd) stop if this session started them.
    rabbitmq.stop_if_started()
