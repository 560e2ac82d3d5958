"""Event buses: the embedded one (local.py) and, later, RabbitMQ (amqp.py)."""
