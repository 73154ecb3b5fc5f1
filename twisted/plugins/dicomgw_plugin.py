from twisted.application.service import ServiceMaker

dicomgw = ServiceMaker(
    "dicomgw", "gateway.tap", "A DICOM gateway: Storage SCP, payloads, pipelines, export.", "dicomgw"
)
