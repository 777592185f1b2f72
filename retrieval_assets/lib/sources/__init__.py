"""Conversation sources: streaming readers for chat exports, formats recognised per record.

- ChatGPT `conversations.json` (chatgpt.py), Claude `conversations.json` (claude.py), ShareGPT
  JSON (sharegpt.py): records of a JSON export, each recognised by the first format in
  registry.RECORD_FORMATS that claims it, so one directory can hold several;
- JSONL with one message per line (jsonl.py), in any order.

Every problem is recorded on the ParseReport with the file and position; good records keep
flowing (domain.py says which problems hold deletions back).
"""

from retrieval_assets.lib.sources.domain import (
    USER_ROLES,
    BadRecord,
    Conversation,
    Limits,
    ParseReport,
    Problem,
    Turn,
    parse_timestamp,
)
from retrieval_assets.lib.sources.files import source_files
from retrieval_assets.lib.sources.registry import (
    DEFAULT_USER_ID,
    ConversationSourceResource,
    read_conversations,
)

__all__ = [
    "DEFAULT_USER_ID",
    "USER_ROLES",
    "BadRecord",
    "Conversation",
    "ConversationSourceResource",
    "Limits",
    "ParseReport",
    "Problem",
    "Turn",
    "parse_timestamp",
    "read_conversations",
    "source_files",
]
