"""Outbox rules every Store shares: which rows an admin may resolve, and how an in-doubt row is
worded. The statuses themselves are jobs.NotificationStatus."""

from __future__ import annotations

from llm_batch_queue.jobs import Notification, NotificationStatus

IN_DOUBT_ERROR = (
    "in doubt: its sender stopped between claiming it and recording the send, and the transport "
    "cannot dedupe a second copy; not sent again until an admin resends it or marks it sent"
)

RESOLVABLE = (NotificationStatus.IN_DOUBT, NotificationStatus.FAILED)


def check_resolvable(note: Notification) -> None:
    """ValueError unless an admin may resend the row or mark it sent."""
    if note.status not in RESOLVABLE:
        raise ValueError(
            f"notification {note.id} is {note.status.value}: only one that is in doubt or "
            "failed can be resent or marked sent"
        )
