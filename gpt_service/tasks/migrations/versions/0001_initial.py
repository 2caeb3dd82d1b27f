"""The schema of release 0.1.0 (one server): tasks, their metrics and their logs.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "tasks",
        sa.Column("task_id", sa.String(32), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False, index=True),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("output_dir", sa.Text),
        sa.Column("adapter_path", sa.Text),
        sa.Column("result", sa.JSON),
        sa.Column("error", sa.Text),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("total_steps", sa.Integer),
        sa.Column("epoch", sa.Float),
        sa.Column("loss", sa.Float),
        sa.Column("eval_loss", sa.Float),
        sa.Column("learning_rate", sa.Float),
        sa.Column("tokens_per_second", sa.Float),
        sa.Column("eta_seconds", sa.Float),
        sa.Column("pid", sa.Integer),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("resume", sa.Boolean, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("created_at", WHEN, nullable=False, index=True),
        sa.Column("started_at", WHEN),
        sa.Column("finished_at", WHEN),
        sa.Column("updated_at", WHEN, nullable=False),
    )
    op.create_table(
        "task_metrics",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("task_id", sa.String(32), sa.ForeignKey("tasks.task_id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("step", sa.Integer, nullable=False),
        sa.Column("epoch", sa.Float),
        sa.Column("loss", sa.Float),
        sa.Column("eval_loss", sa.Float),
        sa.Column("learning_rate", sa.Float),
    )
    op.create_table(
        "task_logs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("task_id", sa.String(32), sa.ForeignKey("tasks.task_id", ondelete="CASCADE"), nullable=False,
                  index=True),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("line", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("task_logs")
    op.drop_table("task_metrics")
    op.drop_table("tasks")
