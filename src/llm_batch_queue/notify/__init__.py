"""Notifications: outbox delivery, templates and transports."""

from llm_batch_queue.notify.attachments import (
    AttachmentStore,
    LinkLargeAttachments,
    LocalDirectoryStore,
)
from llm_batch_queue.notify.errors import DeliveryError
from llm_batch_queue.notify.message import XLSX_MIME, Attachment, Message
from llm_batch_queue.notify.outbox import OutboxDelivery
from llm_batch_queue.notify.resend import (
    RESEND_ATTACHMENT_LIMIT_BYTES,
    ResendSettings,
    ResendTransport,
)
from llm_batch_queue.notify.smtp import SMTPSettings, SMTPTransport
from llm_batch_queue.notify.templates import Rendered, TemplateRenderer
from llm_batch_queue.notify.transport import DryRunTransport, MemoryTransport, Transport

__all__ = [
    "RESEND_ATTACHMENT_LIMIT_BYTES",
    "XLSX_MIME",
    "Attachment",
    "AttachmentStore",
    "DeliveryError",
    "DryRunTransport",
    "LinkLargeAttachments",
    "LocalDirectoryStore",
    "MemoryTransport",
    "Message",
    "OutboxDelivery",
    "Rendered",
    "ResendSettings",
    "ResendTransport",
    "SMTPSettings",
    "SMTPTransport",
    "TemplateRenderer",
    "Transport",
]
