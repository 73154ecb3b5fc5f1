"""dicomgw: a DICOM gateway daemon on Twisted."""

__version__ = "0.1.0"

# The project's own Implementation Class UID (PS3.7 D.3.3.2), a UUID-derived
# UID under the 2.25 root (PS3.5 B.2).  It never changes between releases;
# the version name below tells releases apart.
IMPLEMENTATION_CLASS_UID = "2.25.329404038041321635874148784579610892235"
IMPLEMENTATION_VERSION_NAME = "DICOMGW_0_1"
