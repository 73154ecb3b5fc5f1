"""SOP class and transfer syntax UIDs, and how the gateway classifies them.

Pure data and predicates: no I/O, no Twisted.

The UID tables below are transcribed from the DICOM registry of UIDs
(PS3.6 Annex A).  Storage SOP classes are those of the Storage Service Class
(PS3.4 Annex B) and the Non-Patient Object Storage Service Class (PS3.4
Annex GG), retired ones included, since old modalities still send them.
Everything the registry lists as a SOP class of another service (query /
retrieve, worklist, MPPS, storage commitment, print, verification, UPS ...)
is in the non-storage table.

The gateway is a storage sink: a SOP class it does not know at all is treated
as storage (see :func:`is_storage_sop_class`), so new storage classes
published after this table was written are accepted without a code change.
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------------------
# Well-known UIDs
# ---------------------------------------------------------------------------

#: Verification SOP Class (PS3.4 Annex A), the abstract syntax of C-ECHO.
VERIFICATION = "1.2.840.10008.1.1"

#: Storage Commitment Push Model SOP Class (PS3.4 Annex J).
STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"

# Transfer syntaxes (PS3.5 section 10 and Annex A; UIDs from PS3.6 Annex A).
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
ENCAPSULATED_UNCOMPRESSED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.98"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"  # retired, still seen in the wild
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"  # process 1
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"  # processes 2 and 4
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.57"  # process 14
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"  # process 14, selection value 1
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR_LOSSLESS = "1.2.840.10008.1.2.4.81"
JPEG_2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEG_2000 = "1.2.840.10008.1.2.4.91"
JPEG_2000_MC_LOSSLESS = "1.2.840.10008.1.2.4.92"
JPEG_2000_MC = "1.2.840.10008.1.2.4.93"
JPIP_REFERENCED = "1.2.840.10008.1.2.4.94"
JPIP_REFERENCED_DEFLATE = "1.2.840.10008.1.2.4.95"
MPEG2_MPML = "1.2.840.10008.1.2.4.100"
MPEG2_MPHL = "1.2.840.10008.1.2.4.101"
MPEG4_HP41 = "1.2.840.10008.1.2.4.102"
MPEG4_HP41_BD = "1.2.840.10008.1.2.4.103"
MPEG4_HP42_2D = "1.2.840.10008.1.2.4.104"
MPEG4_HP42_3D = "1.2.840.10008.1.2.4.105"
MPEG4_HP42_STEREO = "1.2.840.10008.1.2.4.106"
HEVC_MP51 = "1.2.840.10008.1.2.4.107"
HEVC_M10P51 = "1.2.840.10008.1.2.4.108"
HTJ2K_LOSSLESS = "1.2.840.10008.1.2.4.201"
HTJ2K_LOSSLESS_RPCL = "1.2.840.10008.1.2.4.202"
HTJ2K = "1.2.840.10008.1.2.4.203"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"

#: Transfer syntaxes whose data set is not compressed or deflated: the
#: gateway can read attributes out of these without a codec.
NATIVE_TRANSFER_SYNTAXES = frozenset(
    {
        IMPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_BIG_ENDIAN,
    }
)

#: Every transfer syntax of PS3.6 Annex A the gateway knows by name
#: (the "Fragmentable" MPEG variants included).
KNOWN_TRANSFER_SYNTAXES = frozenset(
    {
        IMPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_LITTLE_ENDIAN,
        ENCAPSULATED_UNCOMPRESSED_EXPLICIT_VR_LITTLE_ENDIAN,
        DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
        EXPLICIT_VR_BIG_ENDIAN,
        JPEG_BASELINE,
        JPEG_EXTENDED,
        JPEG_LOSSLESS,
        JPEG_LOSSLESS_SV1,
        JPEG_LS_LOSSLESS,
        JPEG_LS_NEAR_LOSSLESS,
        JPEG_2000_LOSSLESS,
        JPEG_2000,
        JPEG_2000_MC_LOSSLESS,
        JPEG_2000_MC,
        JPIP_REFERENCED,
        JPIP_REFERENCED_DEFLATE,
        MPEG2_MPML,
        MPEG2_MPML + ".1",
        MPEG2_MPHL,
        MPEG2_MPHL + ".1",
        MPEG4_HP41,
        MPEG4_HP41 + ".1",
        MPEG4_HP41_BD,
        MPEG4_HP41_BD + ".1",
        MPEG4_HP42_2D,
        MPEG4_HP42_2D + ".1",
        MPEG4_HP42_3D,
        MPEG4_HP42_3D + ".1",
        MPEG4_HP42_STEREO,
        MPEG4_HP42_STEREO + ".1",
        HEVC_MP51,
        HEVC_M10P51,
        HTJ2K_LOSSLESS,
        HTJ2K_LOSSLESS_RPCL,
        HTJ2K,
        RLE_LOSSLESS,
        # retired JPEG processes (PS3.6 Annex A), still negotiable
        *(f"1.2.840.10008.1.2.4.{n}" for n in range(52, 57)),
        *(f"1.2.840.10008.1.2.4.{n}" for n in range(58, 67)),
    }
)

# ---------------------------------------------------------------------------
# SOP class tables: one "UID  name" per line, parsed once at import.
# ---------------------------------------------------------------------------

_STORAGE_TABLE = """
1.2.840.10008.1.3.10              Media Storage Directory Storage
1.2.840.10008.5.1.1.27            Stored Print Storage SOP Class (Retired)
1.2.840.10008.5.1.1.29            Hardcopy Grayscale Image Storage SOP Class (Retired)
1.2.840.10008.5.1.1.30            Hardcopy Color Image Storage SOP Class (Retired)
1.2.840.10008.5.1.4.1.1.1         Computed Radiography Image Storage
1.2.840.10008.5.1.4.1.1.1.1       Digital X-Ray Image Storage - For Presentation
1.2.840.10008.5.1.4.1.1.1.1.1     Digital X-Ray Image Storage - For Processing
1.2.840.10008.5.1.4.1.1.1.2       Digital Mammography X-Ray Image Storage - For Presentation
1.2.840.10008.5.1.4.1.1.1.2.1     Digital Mammography X-Ray Image Storage - For Processing
1.2.840.10008.5.1.4.1.1.1.3       Digital Intra-Oral X-Ray Image Storage - For Presentation
1.2.840.10008.5.1.4.1.1.1.3.1     Digital Intra-Oral X-Ray Image Storage - For Processing
1.2.840.10008.5.1.4.1.1.2         CT Image Storage
1.2.840.10008.5.1.4.1.1.2.1       Enhanced CT Image Storage
1.2.840.10008.5.1.4.1.1.2.2       Legacy Converted Enhanced CT Image Storage
1.2.840.10008.5.1.4.1.1.3         Ultrasound Multi-frame Image Storage (Retired)
1.2.840.10008.5.1.4.1.1.3.1       Ultrasound Multi-frame Image Storage
1.2.840.10008.5.1.4.1.1.4         MR Image Storage
1.2.840.10008.5.1.4.1.1.4.1       Enhanced MR Image Storage
1.2.840.10008.5.1.4.1.1.4.2       MR Spectroscopy Storage
1.2.840.10008.5.1.4.1.1.4.3       Enhanced MR Color Image Storage
1.2.840.10008.5.1.4.1.1.4.4       Legacy Converted Enhanced MR Image Storage
1.2.840.10008.5.1.4.1.1.5         Nuclear Medicine Image Storage (Retired)
1.2.840.10008.5.1.4.1.1.6         Ultrasound Image Storage (Retired)
1.2.840.10008.5.1.4.1.1.6.1       Ultrasound Image Storage
1.2.840.10008.5.1.4.1.1.6.2       Enhanced US Volume Storage
1.2.840.10008.5.1.4.1.1.6.3       Photoacoustic Image Storage
1.2.840.10008.5.1.4.1.1.7         Secondary Capture Image Storage
1.2.840.10008.5.1.4.1.1.7.1       Multi-frame Single Bit Secondary Capture Image Storage
1.2.840.10008.5.1.4.1.1.7.2       Multi-frame Grayscale Byte Secondary Capture Image Storage
1.2.840.10008.5.1.4.1.1.7.3       Multi-frame Grayscale Word Secondary Capture Image Storage
1.2.840.10008.5.1.4.1.1.7.4       Multi-frame True Color Secondary Capture Image Storage
1.2.840.10008.5.1.4.1.1.8         Standalone Overlay Storage (Retired)
1.2.840.10008.5.1.4.1.1.9         Standalone Curve Storage (Retired)
1.2.840.10008.5.1.4.1.1.9.1       Waveform Storage - Trial (Retired)
1.2.840.10008.5.1.4.1.1.9.1.1     12-lead ECG Waveform Storage
1.2.840.10008.5.1.4.1.1.9.1.2     General ECG Waveform Storage
1.2.840.10008.5.1.4.1.1.9.1.3     Ambulatory ECG Waveform Storage
1.2.840.10008.5.1.4.1.1.9.1.4     General 32-bit ECG Waveform Storage
1.2.840.10008.5.1.4.1.1.9.2.1     Hemodynamic Waveform Storage
1.2.840.10008.5.1.4.1.1.9.3.1     Cardiac Electrophysiology Waveform Storage
1.2.840.10008.5.1.4.1.1.9.4.1     Basic Voice Audio Waveform Storage
1.2.840.10008.5.1.4.1.1.9.4.2     General Audio Waveform Storage
1.2.840.10008.5.1.4.1.1.9.5.1     Arterial Pulse Waveform Storage
1.2.840.10008.5.1.4.1.1.9.6.1     Respiratory Waveform Storage
1.2.840.10008.5.1.4.1.1.9.6.2     Multi-channel Respiratory Waveform Storage
1.2.840.10008.5.1.4.1.1.9.7.1     Routine Scalp Electroencephalogram Waveform Storage
1.2.840.10008.5.1.4.1.1.9.7.2     Electromyogram Waveform Storage
1.2.840.10008.5.1.4.1.1.9.7.3     Electrooculogram Waveform Storage
1.2.840.10008.5.1.4.1.1.9.7.4     Sleep Electroencephalogram Waveform Storage
1.2.840.10008.5.1.4.1.1.9.8.1     Body Position Waveform Storage
1.2.840.10008.5.1.4.1.1.9.100.1   Waveform Presentation State Storage
1.2.840.10008.5.1.4.1.1.9.100.2   Waveform Acquisition Presentation State Storage
1.2.840.10008.5.1.4.1.1.10        Standalone Modality LUT Storage (Retired)
1.2.840.10008.5.1.4.1.1.11        Standalone VOI LUT Storage (Retired)
1.2.840.10008.5.1.4.1.1.11.1      Grayscale Softcopy Presentation State Storage
1.2.840.10008.5.1.4.1.1.11.2      Color Softcopy Presentation State Storage
1.2.840.10008.5.1.4.1.1.11.3      Pseudo-Color Softcopy Presentation State Storage
1.2.840.10008.5.1.4.1.1.11.4      Blending Softcopy Presentation State Storage
1.2.840.10008.5.1.4.1.1.11.5      XA/XRF Grayscale Softcopy Presentation State Storage
1.2.840.10008.5.1.4.1.1.11.6      Grayscale Planar MPR Volumetric Presentation State Storage
1.2.840.10008.5.1.4.1.1.11.7      Compositing Planar MPR Volumetric Presentation State Storage
1.2.840.10008.5.1.4.1.1.11.8      Advanced Blending Presentation State Storage
1.2.840.10008.5.1.4.1.1.11.9      Volume Rendering Volumetric Presentation State Storage
1.2.840.10008.5.1.4.1.1.11.10     Segmented Volume Rendering Volumetric Presentation State Storage
1.2.840.10008.5.1.4.1.1.11.11     Multiple Volume Rendering Volumetric Presentation State Storage
1.2.840.10008.5.1.4.1.1.11.12     Variable Modality LUT Softcopy Presentation State Storage
1.2.840.10008.5.1.4.1.1.12.1      X-Ray Angiographic Image Storage
1.2.840.10008.5.1.4.1.1.12.1.1    Enhanced XA Image Storage
1.2.840.10008.5.1.4.1.1.12.2      X-Ray Radiofluoroscopic Image Storage
1.2.840.10008.5.1.4.1.1.12.2.1    Enhanced XRF Image Storage
1.2.840.10008.5.1.4.1.1.12.3      X-Ray Angiographic Bi-Plane Image Storage (Retired)
1.2.840.10008.5.1.4.1.1.13.1.1    X-Ray 3D Angiographic Image Storage
1.2.840.10008.5.1.4.1.1.13.1.2    X-Ray 3D Craniofacial Image Storage
1.2.840.10008.5.1.4.1.1.13.1.3    Breast Tomosynthesis Image Storage
1.2.840.10008.5.1.4.1.1.13.1.4    Breast Projection X-Ray Image Storage - For Presentation
1.2.840.10008.5.1.4.1.1.13.1.5    Breast Projection X-Ray Image Storage - For Processing
1.2.840.10008.5.1.4.1.1.14.1      Intravascular Optical Coherence Tomography Image Storage - For Presentation
1.2.840.10008.5.1.4.1.1.14.2      Intravascular Optical Coherence Tomography Image Storage - For Processing
1.2.840.10008.5.1.4.1.1.20        Nuclear Medicine Image Storage
1.2.840.10008.5.1.4.1.1.30        Parametric Map Storage
1.2.840.10008.5.1.4.1.1.66        Raw Data Storage
1.2.840.10008.5.1.4.1.1.66.1      Spatial Registration Storage
1.2.840.10008.5.1.4.1.1.66.2      Spatial Fiducials Storage
1.2.840.10008.5.1.4.1.1.66.3      Deformable Spatial Registration Storage
1.2.840.10008.5.1.4.1.1.66.4      Segmentation Storage
1.2.840.10008.5.1.4.1.1.66.5      Surface Segmentation Storage
1.2.840.10008.5.1.4.1.1.66.6      Tractography Results Storage
1.2.840.10008.5.1.4.1.1.66.7      Label Map Segmentation Storage
1.2.840.10008.5.1.4.1.1.66.8      Height Map Segmentation Storage
1.2.840.10008.5.1.4.1.1.67        Real World Value Mapping Storage
1.2.840.10008.5.1.4.1.1.68.1      Surface Scan Mesh Storage
1.2.840.10008.5.1.4.1.1.68.2      Surface Scan Point Cloud Storage
1.2.840.10008.5.1.4.1.1.77.1      VL Image Storage - Trial (Retired)
1.2.840.10008.5.1.4.1.1.77.1.1    VL Endoscopic Image Storage
1.2.840.10008.5.1.4.1.1.77.1.1.1  Video Endoscopic Image Storage
1.2.840.10008.5.1.4.1.1.77.1.2    VL Microscopic Image Storage
1.2.840.10008.5.1.4.1.1.77.1.2.1  Video Microscopic Image Storage
1.2.840.10008.5.1.4.1.1.77.1.3    VL Slide-Coordinates Microscopic Image Storage
1.2.840.10008.5.1.4.1.1.77.1.4    VL Photographic Image Storage
1.2.840.10008.5.1.4.1.1.77.1.4.1  Video Photographic Image Storage
1.2.840.10008.5.1.4.1.1.77.1.5.1  Ophthalmic Photography 8 Bit Image Storage
1.2.840.10008.5.1.4.1.1.77.1.5.2  Ophthalmic Photography 16 Bit Image Storage
1.2.840.10008.5.1.4.1.1.77.1.5.3  Stereometric Relationship Storage
1.2.840.10008.5.1.4.1.1.77.1.5.4  Ophthalmic Tomography Image Storage
1.2.840.10008.5.1.4.1.1.77.1.5.5  Wide Field Ophthalmic Photography Stereographic Projection Image Storage
1.2.840.10008.5.1.4.1.1.77.1.5.6  Wide Field Ophthalmic Photography 3D Coordinates Image Storage
1.2.840.10008.5.1.4.1.1.77.1.5.7  Ophthalmic Optical Coherence Tomography En Face Image Storage
1.2.840.10008.5.1.4.1.1.77.1.5.8  Ophthalmic Optical Coherence Tomography B-scan Volume Analysis Storage
1.2.840.10008.5.1.4.1.1.77.1.6    VL Whole Slide Microscopy Image Storage
1.2.840.10008.5.1.4.1.1.77.1.7    Dermoscopic Photography Image Storage
1.2.840.10008.5.1.4.1.1.77.1.8    Confocal Microscopy Image Storage
1.2.840.10008.5.1.4.1.1.77.1.9    Confocal Microscopy Tiled Pyramidal Image Storage
1.2.840.10008.5.1.4.1.1.77.2      VL Multi-frame Image Storage - Trial (Retired)
1.2.840.10008.5.1.4.1.1.78.1      Lensometry Measurements Storage
1.2.840.10008.5.1.4.1.1.78.2      Autorefraction Measurements Storage
1.2.840.10008.5.1.4.1.1.78.3      Keratometry Measurements Storage
1.2.840.10008.5.1.4.1.1.78.4      Subjective Refraction Measurements Storage
1.2.840.10008.5.1.4.1.1.78.5      Visual Acuity Measurements Storage
1.2.840.10008.5.1.4.1.1.78.6      Spectacle Prescription Report Storage
1.2.840.10008.5.1.4.1.1.78.7      Ophthalmic Axial Measurements Storage
1.2.840.10008.5.1.4.1.1.78.8      Intraocular Lens Calculations Storage
1.2.840.10008.5.1.4.1.1.79.1      Macular Grid Thickness and Volume Report Storage
1.2.840.10008.5.1.4.1.1.80.1      Ophthalmic Visual Field Static Perimetry Measurements Storage
1.2.840.10008.5.1.4.1.1.81.1      Ophthalmic Thickness Map Storage
1.2.840.10008.5.1.4.1.1.82.1      Corneal Topography Map Storage
1.2.840.10008.5.1.4.1.1.88.1      Text SR Storage - Trial (Retired)
1.2.840.10008.5.1.4.1.1.88.2      Audio SR Storage - Trial (Retired)
1.2.840.10008.5.1.4.1.1.88.3      Detail SR Storage - Trial (Retired)
1.2.840.10008.5.1.4.1.1.88.4      Comprehensive SR Storage - Trial (Retired)
1.2.840.10008.5.1.4.1.1.88.11     Basic Text SR Storage
1.2.840.10008.5.1.4.1.1.88.22     Enhanced SR Storage
1.2.840.10008.5.1.4.1.1.88.33     Comprehensive SR Storage
1.2.840.10008.5.1.4.1.1.88.34     Comprehensive 3D SR Storage
1.2.840.10008.5.1.4.1.1.88.35     Extensible SR Storage
1.2.840.10008.5.1.4.1.1.88.40     Procedure Log Storage
1.2.840.10008.5.1.4.1.1.88.50     Mammography CAD SR Storage
1.2.840.10008.5.1.4.1.1.88.59     Key Object Selection Document Storage
1.2.840.10008.5.1.4.1.1.88.65     Chest CAD SR Storage
1.2.840.10008.5.1.4.1.1.88.67     X-Ray Radiation Dose SR Storage
1.2.840.10008.5.1.4.1.1.88.68     Radiopharmaceutical Radiation Dose SR Storage
1.2.840.10008.5.1.4.1.1.88.69     Colon CAD SR Storage
1.2.840.10008.5.1.4.1.1.88.70     Implantation Plan SR Storage
1.2.840.10008.5.1.4.1.1.88.71     Acquisition Context SR Storage
1.2.840.10008.5.1.4.1.1.88.72     Simplified Adult Echo SR Storage
1.2.840.10008.5.1.4.1.1.88.73     Patient Radiation Dose SR Storage
1.2.840.10008.5.1.4.1.1.88.74     Planned Imaging Agent Administration SR Storage
1.2.840.10008.5.1.4.1.1.88.75     Performed Imaging Agent Administration SR Storage
1.2.840.10008.5.1.4.1.1.88.76     Enhanced X-Ray Radiation Dose SR Storage
1.2.840.10008.5.1.4.1.1.88.77     Waveform Annotation SR Storage
1.2.840.10008.5.1.4.1.1.90.1      Content Assessment Results Storage
1.2.840.10008.5.1.4.1.1.91.1      Microscopy Bulk Simple Annotations Storage
1.2.840.10008.5.1.4.1.1.104.1     Encapsulated PDF Storage
1.2.840.10008.5.1.4.1.1.104.2     Encapsulated CDA Storage
1.2.840.10008.5.1.4.1.1.104.3     Encapsulated STL Storage
1.2.840.10008.5.1.4.1.1.104.4     Encapsulated OBJ Storage
1.2.840.10008.5.1.4.1.1.104.5     Encapsulated MTL Storage
1.2.840.10008.5.1.4.1.1.128       Positron Emission Tomography Image Storage
1.2.840.10008.5.1.4.1.1.128.1     Legacy Converted Enhanced PET Image Storage
1.2.840.10008.5.1.4.1.1.129       Standalone PET Curve Storage (Retired)
1.2.840.10008.5.1.4.1.1.130       Enhanced PET Image Storage
1.2.840.10008.5.1.4.1.1.131       Basic Structured Display Storage
1.2.840.10008.5.1.4.1.1.200.1     CT Defined Procedure Protocol Storage
1.2.840.10008.5.1.4.1.1.200.2     CT Performed Procedure Protocol Storage
1.2.840.10008.5.1.4.1.1.200.3     Protocol Approval Storage
1.2.840.10008.5.1.4.1.1.200.7     XA Defined Procedure Protocol Storage
1.2.840.10008.5.1.4.1.1.200.8     XA Performed Procedure Protocol Storage
1.2.840.10008.5.1.4.1.1.201.1     Inventory Storage
1.2.840.10008.5.1.4.1.1.481.1     RT Image Storage
1.2.840.10008.5.1.4.1.1.481.2     RT Dose Storage
1.2.840.10008.5.1.4.1.1.481.3     RT Structure Set Storage
1.2.840.10008.5.1.4.1.1.481.4     RT Beams Treatment Record Storage
1.2.840.10008.5.1.4.1.1.481.5     RT Plan Storage
1.2.840.10008.5.1.4.1.1.481.6     RT Brachy Treatment Record Storage
1.2.840.10008.5.1.4.1.1.481.7     RT Treatment Summary Record Storage
1.2.840.10008.5.1.4.1.1.481.8     RT Ion Plan Storage
1.2.840.10008.5.1.4.1.1.481.9     RT Ion Beams Treatment Record Storage
1.2.840.10008.5.1.4.1.1.481.10    RT Physician Intent Storage
1.2.840.10008.5.1.4.1.1.481.11    RT Segment Annotation Storage
1.2.840.10008.5.1.4.1.1.481.12    RT Radiation Set Storage
1.2.840.10008.5.1.4.1.1.481.13    C-Arm Photon-Electron Radiation Storage
1.2.840.10008.5.1.4.1.1.481.14    Tomotherapeutic Radiation Storage
1.2.840.10008.5.1.4.1.1.481.15    Robotic-Arm Radiation Storage
1.2.840.10008.5.1.4.1.1.481.16    RT Radiation Record Set Storage
1.2.840.10008.5.1.4.1.1.481.17    RT Radiation Salvage Record Storage
1.2.840.10008.5.1.4.1.1.481.18    Tomotherapeutic Radiation Record Storage
1.2.840.10008.5.1.4.1.1.481.19    C-Arm Photon-Electron Radiation Record Storage
1.2.840.10008.5.1.4.1.1.481.20    Robotic Radiation Record Storage
1.2.840.10008.5.1.4.1.1.481.21    RT Radiation Set Delivery Instruction Storage
1.2.840.10008.5.1.4.1.1.481.22    RT Treatment Preparation Storage
1.2.840.10008.5.1.4.1.1.481.23    Enhanced RT Image Storage
1.2.840.10008.5.1.4.1.1.481.24    Enhanced Continuous RT Image Storage
1.2.840.10008.5.1.4.1.1.481.25    RT Patient Position Acquisition Instruction Storage
1.2.840.10008.5.1.4.1.1.501.1     DICOS CT Image Storage
1.2.840.10008.5.1.4.1.1.501.2.1   DICOS Digital X-Ray Image Storage - For Presentation
1.2.840.10008.5.1.4.1.1.501.2.2   DICOS Digital X-Ray Image Storage - For Processing
1.2.840.10008.5.1.4.1.1.501.3     DICOS Threat Detection Report Storage
1.2.840.10008.5.1.4.1.1.501.4     DICOS 2D AIT Storage
1.2.840.10008.5.1.4.1.1.501.5     DICOS 3D AIT Storage
1.2.840.10008.5.1.4.1.1.501.6     DICOS Quadrupole Resonance (QR) Storage
1.2.840.10008.5.1.4.1.1.601.1     Eddy Current Image Storage
1.2.840.10008.5.1.4.1.1.601.2     Eddy Current Multi-frame Image Storage
1.2.840.10008.5.1.4.34.1          RT Beams Delivery Instruction Storage - Trial (Retired)
1.2.840.10008.5.1.4.34.7          RT Beams Delivery Instruction Storage
1.2.840.10008.5.1.4.34.10         RT Brachy Application Setup Delivery Instruction Storage
1.2.840.10008.5.1.4.38.1          Hanging Protocol Storage
1.2.840.10008.5.1.4.39.1          Color Palette Storage
1.2.840.10008.5.1.4.43.1          Generic Implant Template Storage
1.2.840.10008.5.1.4.44.1          Implant Assembly Template Storage
1.2.840.10008.5.1.4.45.1          Implant Template Group Storage
"""

_NON_STORAGE_TABLE = """
1.2.840.10008.1.1                 Verification SOP Class
1.2.840.10008.1.9                 Basic Study Content Notification SOP Class (Retired)
1.2.840.10008.1.20.1              Storage Commitment Push Model SOP Class
1.2.840.10008.1.20.2              Storage Commitment Pull Model SOP Class (Retired)
1.2.840.10008.1.40                Procedural Event Logging SOP Class
1.2.840.10008.1.42                Substance Administration Logging SOP Class
1.2.840.10008.3.1.2.1.1           Detached Patient Management SOP Class (Retired)
1.2.840.10008.3.1.2.1.4           Detached Patient Management Meta SOP Class (Retired)
1.2.840.10008.3.1.2.2.1           Detached Visit Management SOP Class (Retired)
1.2.840.10008.3.1.2.3.1           Detached Study Management SOP Class (Retired)
1.2.840.10008.3.1.2.3.2           Study Component Management SOP Class (Retired)
1.2.840.10008.3.1.2.3.3           Modality Performed Procedure Step SOP Class
1.2.840.10008.3.1.2.3.4           Modality Performed Procedure Step Retrieve SOP Class
1.2.840.10008.3.1.2.3.5           Modality Performed Procedure Step Notification SOP Class
1.2.840.10008.3.1.2.5.1           Detached Results Management SOP Class (Retired)
1.2.840.10008.3.1.2.5.4           Detached Results Management Meta SOP Class (Retired)
1.2.840.10008.3.1.2.5.5           Detached Study Management Meta SOP Class (Retired)
1.2.840.10008.3.1.2.6.1           Detached Interpretation Management SOP Class (Retired)
1.2.840.10008.5.1.1.1             Basic Film Session SOP Class
1.2.840.10008.5.1.1.2             Basic Film Box SOP Class
1.2.840.10008.5.1.1.4             Basic Grayscale Image Box SOP Class
1.2.840.10008.5.1.1.4.1           Basic Color Image Box SOP Class
1.2.840.10008.5.1.1.4.2           Referenced Image Box SOP Class (Retired)
1.2.840.10008.5.1.1.9             Basic Grayscale Print Management Meta SOP Class
1.2.840.10008.5.1.1.9.1           Referenced Grayscale Print Management Meta SOP Class (Retired)
1.2.840.10008.5.1.1.14            Print Job SOP Class
1.2.840.10008.5.1.1.15            Basic Annotation Box SOP Class
1.2.840.10008.5.1.1.16            Printer SOP Class
1.2.840.10008.5.1.1.16.376        Printer Configuration Retrieval SOP Class
1.2.840.10008.5.1.1.18            Basic Color Print Management Meta SOP Class
1.2.840.10008.5.1.1.18.1          Referenced Color Print Management Meta SOP Class (Retired)
1.2.840.10008.5.1.1.22            VOI LUT Box SOP Class
1.2.840.10008.5.1.1.23            Presentation LUT SOP Class
1.2.840.10008.5.1.1.24            Image Overlay Box SOP Class (Retired)
1.2.840.10008.5.1.1.24.1          Basic Print Image Overlay Box SOP Class (Retired)
1.2.840.10008.5.1.1.26            Print Queue Management SOP Class (Retired)
1.2.840.10008.5.1.1.31            Pull Print Request SOP Class (Retired)
1.2.840.10008.5.1.1.32            Pull Stored Print Management Meta SOP Class (Retired)
1.2.840.10008.5.1.1.33            Media Creation Management SOP Class UID
1.2.840.10008.5.1.1.40            Display System SOP Class
1.2.840.10008.5.1.4.1.1.200.4     Protocol Approval Information Model - FIND
1.2.840.10008.5.1.4.1.1.200.5     Protocol Approval Information Model - MOVE
1.2.840.10008.5.1.4.1.1.200.6     Protocol Approval Information Model - GET
1.2.840.10008.5.1.4.1.1.201.2     Inventory - FIND
1.2.840.10008.5.1.4.1.1.201.3     Inventory - MOVE
1.2.840.10008.5.1.4.1.1.201.4     Inventory - GET
1.2.840.10008.5.1.4.1.1.201.5     Inventory Creation
1.2.840.10008.5.1.4.1.1.201.6     Repository Query
1.2.840.10008.5.1.4.1.2.1.1       Patient Root Query/Retrieve Information Model - FIND
1.2.840.10008.5.1.4.1.2.1.2       Patient Root Query/Retrieve Information Model - MOVE
1.2.840.10008.5.1.4.1.2.1.3       Patient Root Query/Retrieve Information Model - GET
1.2.840.10008.5.1.4.1.2.2.1       Study Root Query/Retrieve Information Model - FIND
1.2.840.10008.5.1.4.1.2.2.2       Study Root Query/Retrieve Information Model - MOVE
1.2.840.10008.5.1.4.1.2.2.3       Study Root Query/Retrieve Information Model - GET
1.2.840.10008.5.1.4.1.2.3.1       Patient/Study Only Query/Retrieve Information Model - FIND (Retired)
1.2.840.10008.5.1.4.1.2.3.2       Patient/Study Only Query/Retrieve Information Model - MOVE (Retired)
1.2.840.10008.5.1.4.1.2.3.3       Patient/Study Only Query/Retrieve Information Model - GET (Retired)
1.2.840.10008.5.1.4.1.2.4.2       Composite Instance Root Retrieve - MOVE
1.2.840.10008.5.1.4.1.2.4.3       Composite Instance Root Retrieve - GET
1.2.840.10008.5.1.4.1.2.5.3       Composite Instance Retrieve Without Bulk Data - GET
1.2.840.10008.5.1.4.20.1          Defined Procedure Protocol Information Model - FIND
1.2.840.10008.5.1.4.20.2          Defined Procedure Protocol Information Model - MOVE
1.2.840.10008.5.1.4.20.3          Defined Procedure Protocol Information Model - GET
1.2.840.10008.5.1.4.31            Modality Worklist Information Model - FIND
1.2.840.10008.5.1.4.32            General Purpose Worklist Management Meta SOP Class (Retired)
1.2.840.10008.5.1.4.32.1          General Purpose Worklist Information Model - FIND (Retired)
1.2.840.10008.5.1.4.32.2          General Purpose Scheduled Procedure Step SOP Class (Retired)
1.2.840.10008.5.1.4.32.3          General Purpose Performed Procedure Step SOP Class (Retired)
1.2.840.10008.5.1.4.33            Instance Availability Notification SOP Class
1.2.840.10008.5.1.4.34.2          RT Conventional Machine Verification - Trial (Retired)
1.2.840.10008.5.1.4.34.3          RT Ion Machine Verification - Trial (Retired)
1.2.840.10008.5.1.4.34.4.1        Unified Procedure Step - Push SOP Class - Trial (Retired)
1.2.840.10008.5.1.4.34.4.2        Unified Procedure Step - Watch SOP Class - Trial (Retired)
1.2.840.10008.5.1.4.34.4.3        Unified Procedure Step - Pull SOP Class - Trial (Retired)
1.2.840.10008.5.1.4.34.4.4        Unified Procedure Step - Event SOP Class - Trial (Retired)
1.2.840.10008.5.1.4.34.6.1        Unified Procedure Step - Push SOP Class
1.2.840.10008.5.1.4.34.6.2        Unified Procedure Step - Watch SOP Class
1.2.840.10008.5.1.4.34.6.3        Unified Procedure Step - Pull SOP Class
1.2.840.10008.5.1.4.34.6.4        Unified Procedure Step - Event SOP Class
1.2.840.10008.5.1.4.34.6.5        Unified Procedure Step - Query SOP Class
1.2.840.10008.5.1.4.34.8          RT Conventional Machine Verification
1.2.840.10008.5.1.4.34.9          RT Ion Machine Verification
1.2.840.10008.5.1.4.37.1          General Relevant Patient Information Query
1.2.840.10008.5.1.4.37.2          Breast Imaging Relevant Patient Information Query
1.2.840.10008.5.1.4.37.3          Cardiac Relevant Patient Information Query
1.2.840.10008.5.1.4.38.2          Hanging Protocol Information Model - FIND
1.2.840.10008.5.1.4.38.3          Hanging Protocol Information Model - MOVE
1.2.840.10008.5.1.4.38.4          Hanging Protocol Information Model - GET
1.2.840.10008.5.1.4.39.2          Color Palette Query/Retrieve Information Model - FIND
1.2.840.10008.5.1.4.39.3          Color Palette Query/Retrieve Information Model - MOVE
1.2.840.10008.5.1.4.39.4          Color Palette Query/Retrieve Information Model - GET
1.2.840.10008.5.1.4.41            Product Characteristics Query SOP Class
1.2.840.10008.5.1.4.42            Substance Approval Query SOP Class
1.2.840.10008.5.1.4.43.2          Generic Implant Template Information Model - FIND
1.2.840.10008.5.1.4.43.3          Generic Implant Template Information Model - MOVE
1.2.840.10008.5.1.4.43.4          Generic Implant Template Information Model - GET
1.2.840.10008.5.1.4.44.2          Implant Assembly Template Information Model - FIND
1.2.840.10008.5.1.4.44.3          Implant Assembly Template Information Model - MOVE
1.2.840.10008.5.1.4.44.4          Implant Assembly Template Information Model - GET
1.2.840.10008.5.1.4.45.2          Implant Template Group Information Model - FIND
1.2.840.10008.5.1.4.45.3          Implant Template Group Information Model - MOVE
1.2.840.10008.5.1.4.45.4          Implant Template Group Information Model - GET
1.2.840.10008.10.1                Video Endoscopic Image Real-Time Communication
1.2.840.10008.10.2                Video Photographic Image Real-Time Communication
1.2.840.10008.10.3                Audio Waveform Real-Time Communication
1.2.840.10008.10.4                Rendition Selection Document Real-Time Communication
"""


def _parse_table(text: str) -> dict[str, str]:
    table: dict[str, str] = {}
    for line in text.strip().splitlines():
        uid, _, name = line.partition(" ")
        table[uid] = name.strip()
    return table


_STORAGE_NAMES = _parse_table(_STORAGE_TABLE)
_NON_STORAGE_NAMES = _parse_table(_NON_STORAGE_TABLE)

#: Known storage SOP classes (PS3.4 Annex B and GG; retired ones included).
STORAGE_SOP_CLASSES: frozenset[str] = frozenset(_STORAGE_NAMES)

#: Known SOP classes of every other service: verification, query/retrieve,
#: worklist, MPPS, storage commitment, print management, instance
#: availability notification, UPS, hanging protocol / color palette / implant
#: template / protocol queries, real-time communication, and so on.
NON_STORAGE_SOP_CLASSES: frozenset[str] = frozenset(_NON_STORAGE_NAMES)

del _STORAGE_TABLE, _NON_STORAGE_TABLE


def is_storage_sop_class(uid: str) -> bool:
    """True if ``uid`` may be accepted as a storage SOP class.

    Only a UID (PS3.5 9.1) may be.  Then every known storage class is, and
    so is a private UID (outside the DICOM root) that is not a known service:
    the gateway accepts unknown private classes as storage.  Under the DICOM
    root a UID the registry tables do not know is storage only where new
    storage classes are registered (1.2.840.10008.5.1.4.): a transfer syntax
    or an application context name is no SOP class at all.  Trailing
    NUL/space padding is ignored.
    """
    uid = uid.rstrip("\0 ")
    if uid in STORAGE_SOP_CLASSES:
        return True
    if uid in NON_STORAGE_SOP_CLASSES or not is_valid_uid(uid):
        return False
    return not uid.startswith(DICOM_ROOT) or uid.startswith(_STORAGE_ARC)


DICOM_ROOT = "1.2.840.10008."
#: Where the registry puts its storage SOP classes (PS3.6 Annex A).
_STORAGE_ARC = "1.2.840.10008.5.1.4."


def is_known_storage_sop_class(uid: str) -> bool:
    """True only for storage SOP classes listed in the registry table."""
    return uid.rstrip("\0 ") in STORAGE_SOP_CLASSES


def sop_class_name(uid: str) -> str | None:
    """The registry name of a known SOP class (for logs), else None."""
    uid = uid.rstrip("\0 ")
    return _STORAGE_NAMES.get(uid) or _NON_STORAGE_NAMES.get(uid)


# PS3.5 section 9.1: a UID is a series of numeric components separated by
# ".", each component either "0" or digits not starting with "0", the whole
# at most 64 characters.  (The trailing NUL used to pad a UI value to an even
# length is not part of the UID; strip it before calling.)
_UID_RE = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))*\Z")
MAX_UID_LENGTH = 64


def is_valid_uid(value: str) -> bool:
    """Check ``value`` against the UID encoding rules of PS3.5 section 9.1.

    Valid: 1 to 64 characters; components of ASCII digits separated by single
    dots; no empty component (so no leading, trailing or doubled dot); no
    leading zero in a component of more than one digit.
    """
    if not isinstance(value, str) or not 0 < len(value) <= MAX_UID_LENGTH:
        return False
    # re's [0-9] is ASCII only, so other Unicode digits are refused too.
    return _UID_RE.match(value) is not None
