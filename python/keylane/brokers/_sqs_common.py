"""What the SQS FIFO broker and its consumers share: options, the client,
and turning botocore's errors into keylane's."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from keylane.brokers._checks import number, options_of
from keylane.brokers._sqs_codec import DEFAULT_MAX_BYTES
from keylane.errors import BrokerError, BrokerTimeout, ConfigError, UnknownTopic

# Error codes SQS (and ElasticMQ) return that may succeed when tried again.
_RETRIABLE = frozenset(
    {
        "RequestThrottled",
        "ThrottlingException",
        "Throttling",
        "ServiceUnavailable",
        "InternalError",
        "InternalFailure",
        "KmsThrottled",
        "RequestTimeout",
    }
)
_NO_QUEUE = frozenset({"QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue"})


@dataclasses.dataclass(frozen=True)
class Options:
    """``SqsFifoBroker``'s ``config``, checked."""

    visibility_timeout: int = 30
    receivers: int = 1
    wait_time: int = 1
    max_message_bytes: int = DEFAULT_MAX_BYTES
    connect_timeout: float = 5.0
    read_timeout: float = 25.0
    max_attempts: int = 3
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None

    @classmethod
    def of(cls, config: Mapping[str, Any] | None) -> Options:
        return options_of(cls, config, "SqsFifoBroker")

    def __post_init__(self) -> None:
        # SQS allows 0 s to 12 h; below 2 s an extension could not be in time.
        number(self, "visibility_timeout", 2, 43_200, whole=True)
        number(self, "receivers", 1, 64, whole=True)
        number(self, "wait_time", 0, 20, whole=True)
        number(self, "max_message_bytes", 1024, 1_048_576, whole=True)
        number(self, "connect_timeout", 0.1, 300)
        number(self, "read_timeout", 0.1, 300)
        number(self, "max_attempts", 1, 20, whole=True)
        if self.read_timeout <= self.wait_time:
            raise ConfigError(
                f"config['read_timeout'] ({self.read_timeout}) must exceed config['wait_time'] "
                f"({self.wait_time}): a long poll would time out"
            )
        for name in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise ConfigError(f"config[{name!r}] must be a str")


def make_client(endpoint_url: str | None, region: str, o: Options) -> Any:
    """A boto3 SQS client (thread-safe; one per broker). A local endpoint
    without credentials anywhere gets dummy ones (ElasticMQ ignores them)."""
    session = boto3.session.Session()
    key, secret, token = o.aws_access_key_id, o.aws_secret_access_key, o.aws_session_token
    if key is None and endpoint_url is not None and session.get_credentials() is None:
        key, secret = "keylane", "keylane"
    conf = botocore.config.Config(
        connect_timeout=o.connect_timeout,
        read_timeout=o.read_timeout,
        retries={"max_attempts": o.max_attempts, "mode": "standard"},
        max_pool_connections=o.receivers + 8,
    )
    return session.client(
        "sqs",
        endpoint_url=endpoint_url,
        region_name=region,
        config=conf,
        aws_access_key_id=key,
        aws_secret_access_key=secret if key is not None else None,
        aws_session_token=token if key is not None else None,
    )


def broker_error(e: Exception, what: str) -> BrokerError:
    """keylane's error for a botocore failure of ``what``."""
    if isinstance(e, botocore.exceptions.ClientError):
        err = e.response.get("Error", {})
        code = str(err.get("Code", "")) or None
        message = f"SQS {what}: {err.get('Message') or e}"
        if code in _NO_QUEUE:
            return UnknownTopic(
                f"SQS {what}: the queue does not exist (create it first; keylane never "
                "creates queues implicitly)",
                code=code,
            )
        return BrokerError(message, retriable=code in _RETRIABLE, code=code)
    if isinstance(
        e, (botocore.exceptions.ReadTimeoutError, botocore.exceptions.ConnectTimeoutError)
    ):
        return BrokerTimeout(f"SQS {what}: {e}", code=type(e).__name__)
    if isinstance(
        e,
        (
            botocore.exceptions.EndpointConnectionError,
            botocore.exceptions.ConnectionClosedError,
            botocore.exceptions.HTTPClientError,
        ),
    ):
        return BrokerError(f"SQS {what}: {e}", retriable=True, code=type(e).__name__)
    if isinstance(e, botocore.exceptions.NoCredentialsError):
        return BrokerError(
            f"SQS {what}: {e} (set AWS credentials, or config['aws_access_key_id'] and "
            "config['aws_secret_access_key'])",
            code="NoCredentials",
        )
    if isinstance(e, botocore.exceptions.BotoCoreError):
        return BrokerError(f"SQS {what}: {e}", code=type(e).__name__)
    return BrokerError(f"SQS {what}: {type(e).__name__}: {e}")


def check_queue_name(name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ConfigError(f"an SQS FIFO queue name must be a non-empty str, got {name!r}")
    if not name.endswith(".fifo"):
        raise ConfigError(
            f"queue {name!r} is not a FIFO queue name (it must end in '.fifo'): standard "
            "SQS queues keep no order, so keylane cannot consume them"
        )
    if len(name) > 80 or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in name):
        raise ConfigError(
            f"queue name {name!r}: up to 80 ASCII letters, digits, '-' and '_', ending in '.fifo'"
        )
    return name
