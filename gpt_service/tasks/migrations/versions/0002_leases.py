"""Several workers on one database: leases and fencing tokens on tasks, placement needs, attempts, workers.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("tasks") as tasks:
        tasks.add_column(sa.Column("leased_by", sa.String(128)))
        tasks.add_column(sa.Column("lease_expires_at", WHEN))
        tasks.add_column(sa.Column("lease_token", sa.Integer, nullable=False, server_default="0"))
        tasks.add_column(sa.Column("reclaims", sa.Integer, nullable=False, server_default="0"))
        tasks.add_column(sa.Column("need_device", sa.String(16)))
        tasks.add_column(sa.Column("need_processes", sa.Integer, nullable=False, server_default="1"))
        tasks.add_column(sa.Column("need_memory_mb", sa.Integer))
        tasks.create_index("ix_tasks_leased_by", ["leased_by"])
    op.create_table(
        "task_attempts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("task_id", sa.String(32), sa.ForeignKey("tasks.task_id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("lease_token", sa.Integer, nullable=False),
        sa.Column("worker", sa.String(128), nullable=False),
        sa.Column("claimed_at", WHEN, nullable=False),
        sa.Column("ended_at", WHEN),
        sa.Column("outcome", sa.String(32)),
        sa.UniqueConstraint("task_id", "lease_token"),
    )
    op.create_table(
        "workers",
        sa.Column("name", sa.String(128), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("device", sa.String(16), nullable=False),
        sa.Column("device_count", sa.Integer, nullable=False),
        sa.Column("memory_mb", sa.Integer, nullable=False),
        sa.Column("max_tasks", sa.Integer, nullable=False),
        sa.Column("started_at", WHEN, nullable=False),
        sa.Column("heartbeat_at", WHEN, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_table("task_attempts")
    with op.batch_alter_table("tasks") as tasks:
        tasks.drop_index("ix_tasks_leased_by")
        for column in ("need_memory_mb", "need_processes", "need_device", "reclaims", "lease_token",
                       "lease_expires_at", "leased_by"):
            tasks.drop_column(column)
