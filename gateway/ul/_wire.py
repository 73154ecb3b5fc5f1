"""PS3.8 section 9.3: item types and the fixed layouts of PDUs and items.

Shared by the decoder (:mod:`gateway.ul._decode`) and the encoder
(:mod:`gateway.ul._encode`).  All multi-byte integers are big endian
(PS3.8 9.3.1).  Every item and sub-item starts with the same 4-byte header:
item-type (1), reserved (1), item-length (2); only the PDV item (4-byte
length, no type) differs.
"""

from __future__ import annotations

import struct

# PS3.8 9.3.2 / 9.3.3
ITEM_APPLICATION_CONTEXT = 0x10
ITEM_PRESENTATION_CONTEXT_RQ = 0x20
ITEM_PRESENTATION_CONTEXT_AC = 0x21
ITEM_ABSTRACT_SYNTAX = 0x30
ITEM_TRANSFER_SYNTAX = 0x40
ITEM_USER_INFORMATION = 0x50
# PS3.8 Annex D.1 and PS3.7 Annex D.3.3
SUB_MAX_LENGTH = 0x51
SUB_IMPLEMENTATION_CLASS_UID = 0x52
SUB_ASYNC_OPS_WINDOW = 0x53
SUB_ROLE_SELECTION = 0x54
SUB_IMPLEMENTATION_VERSION_NAME = 0x55
SUB_SOP_CLASS_EXTENDED = 0x56
SUB_SOP_CLASS_COMMON_EXTENDED = 0x57
SUB_USER_IDENTITY_RQ = 0x58
SUB_USER_IDENTITY_AC = 0x59

# Item types that only make sense at some other nesting level; seeing one in
# the wrong place is an "unexpected PDU parameter" rather than an unknown item.
PDU_LEVEL_ITEMS = frozenset(
    {
        ITEM_APPLICATION_CONTEXT,
        ITEM_PRESENTATION_CONTEXT_RQ,
        ITEM_PRESENTATION_CONTEXT_AC,
        ITEM_ABSTRACT_SYNTAX,
        ITEM_TRANSFER_SYNTAX,
        ITEM_USER_INFORMATION,
    }
)

# ---------------------------------------------------------------------------
# Fixed layouts
# ---------------------------------------------------------------------------

PDU_HEADER = struct.Struct(">BxI")  # type, reserved, length (PS3.8 9.3.1)
ITEM_HEADER = struct.Struct(">BxH")  # type, reserved, length
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")

# A-ASSOCIATE-RQ/AC fixed part after the PDU header (Tables 9-11 and 9-17):
# protocol-version (2), reserved (2), called AE (16), calling AE (16),
# reserved (32).  In the AC the AE title fields are formally "reserved" but
# carry the values of the RQ; they are decoded the same way.
ASSOC_FIXED = struct.Struct(">H2x16s16s32x")
ASSOC_HEADER = struct.Struct(">BxIH2x16s16s32x")

# Presentation context item value prefixes (Tables 9-13 and 9-18).
PC_RQ_FIXED = struct.Struct(">B3x")  # id, 3 reserved
PC_AC_FIXED = struct.Struct(">BxBx")  # id, reserved, result/reason, reserved

# A-ASSOCIATE-RJ (Table 9-21), A-RELEASE-RQ/RP (9-24/9-25), A-ABORT (9-26):
# 4-byte bodies.
RJ_BODY = struct.Struct(">xBBB")  # reserved, result, source, reason
ABORT_BODY = struct.Struct(">2xBB")  # 2 reserved, source, reason
RJ_PDU = struct.Struct(">BxIxBBB")
ABORT_PDU = struct.Struct(">BxI2xBB")
RELEASE_PDU = struct.Struct(">BxI4x")

# P-DATA-TF (Table 9-22) carrying one PDV item (Table 9-23): PDU type,
# reserved, PDU length, item length, context id, message control header.
PDATA_ONE_PDV = struct.Struct(">BxIIBB")
# PDV item header: item length (4), context id (1), message control header
# (1, Annex E.2; it is the first byte of the item's value).
PDV_HEADER = struct.Struct(">IBB")

ROLE_TAIL = struct.Struct(">BB")  # SCU role, SCP role (PS3.7 D.3.3.4)
ASYNC_OPS = struct.Struct(">HH")  # invoked, performed (PS3.7 D.3.3.3)
