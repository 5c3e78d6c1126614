"""Notifications: outbox delivery, templates and transports."""

from llm_batch_queue.notify.errors import DeliveryError
from llm_batch_queue.notify.message import XLSX_MIME, Attachment, Message
from llm_batch_queue.notify.outbox import OutboxDelivery
from llm_batch_queue.notify.smtp import SMTPSettings, SMTPTransport
from llm_batch_queue.notify.templates import Rendered, TemplateRenderer
from llm_batch_queue.notify.transport import DryRunTransport, MemoryTransport, Transport

__all__ = [
    "XLSX_MIME",
    "Attachment",
    "DeliveryError",
    "DryRunTransport",
    "MemoryTransport",
    "Message",
    "OutboxDelivery",
    "Rendered",
    "SMTPSettings",
    "SMTPTransport",
    "TemplateRenderer",
    "Transport",
]
