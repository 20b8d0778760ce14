"""The device worker's clients of what the VM worker keeps for it (devices/device_worker.py):
guest memory it cannot map, and its non-volatile stores (VMGS files), each call a request over
the device socket that the proxy answers (GuestMemoryRequest/StoreRequest in
devices/device_worker.proto)."""
from hclsim.devices import device_worker_pb2 as pb


class GuestMemoryError(Exception):
    pass


class ProxiedGuestMemory:
    """Guest memory for a device in a worker that cannot map it: each access is a request to
    the proxy, answered from the VM's guest RAM (blocking, one at a time). A device that wants
    it says uses_guest_memory = True and finds it as its guest_memory attribute."""

    def __init__(self, server):         # device_worker.DeviceServer: its ask() sends, waits for the reply
        self.server = server
        self._next = 1
        self.requests = 0

    def _call(self, **op) -> bytes:
        self.requests += 1
        reply = self.server.ask("memory", lambda req_id: pb.GuestMemoryRequest(id=req_id, **op))
        if reply.error:
            raise GuestMemoryError(reply.error)
        return reply.data

    def read(self, address: int, length: int) -> bytes:
        return self._call(read=pb.GuestMemoryRead(address=address, length=length))

    def write(self, address: int, data: bytes) -> None:
        self._call(write=pb.GuestMemoryWrite(address=address, data=bytes(data)))

    def fill(self, address: int, value: int, length: int) -> None:
        self._call(fill=pb.GuestMemoryFill(address=address, value=value & 0xFF, length=length))


class StoreError(Exception):
    pass


class ProxiedStore:
    """A device's non-volatile store (NonVolatileStore: restore() -> bytes or None, persist(data)),
    one VMGS file the VM worker keeps; each call is a request to the proxy. A device names the
    stores it wants in nonvolatile_stores ({attribute: FileId}) and finds them there."""

    def __init__(self, server, file_id: int):
        self.server, self.file_id = server, file_id

    def _call(self, **op) -> pb.StoreResponse:
        reply = self.server.ask("store", lambda req_id: pb.StoreRequest(id=req_id, file_id=self.file_id, **op))
        if reply.error:
            raise StoreError(reply.error)
        return reply

    def restore(self) -> bytes | None:
        reply = self._call(restore=True)
        return reply.data if reply.present else None

    def persist(self, data: bytes) -> None:
        self._call(persist=bytes(data))
