"""The part of the i8042 PS/2 controller Linux touches: status/command and data ports, controller commands, reset."""

from __future__ import annotations

from typing import Callable

#: Offsets from the controller's base port 0x60: the data port (0x60) and the status/command port (0x64).
DATA = 0
STATUS = COMMAND = 4

# Status register bits (Linux include/linux/i8042.h names, without the I8042_ prefix).
STR_OBF = 0x01
STR_IBF = 0x02
STR_SYS = 0x04  # system flag: self test passed
STR_CMDDAT = 0x08  # last write went to the command port
STR_KEYLOCK = 0x10  # set = keyboard not inhibited
STR_AUXDATA = 0x20

# Controller command byte ("CTR", internal RAM byte 0).
CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYS = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40

# Controller commands written to port 0x64.
CMD_CTL_RCTR = 0x20  # 0x20-0x3f: read internal RAM byte (0 = CTR)
CMD_CTL_WCTR = 0x60  # 0x60-0x7f: write internal RAM byte, value follows on the data port
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_CTL_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_KBD_LOOP = 0xD2  # next data byte comes back as if from the keyboard
CMD_AUX_LOOP = 0xD3  # next data byte comes back as if from the mouse
CMD_AUX_SEND = 0xD4  # next data byte goes to the mouse
CMD_PULSE_RESET = 0xFE  # 0xf0-0xff pulse output-port lines whose bit is 0; bit 0 is the CPU reset line

CTL_TEST_OK = 0x55
#: Output port: bit 0 = CPU reset (active low), bit 1 = A20 gate.
OUTPUT_PORT_RESET = 0x01
OUTPUT_PORT_A20 = 0x02


class I8042:
    """An i8042 with no keyboard or mouse attached and no interrupt line: enough for Linux's i8042 driver and reboot.

    Answers the controller commands of Linux's drivers/input/serio/i8042.c (self test 0xAA -> 0x55, interface tests
    0xAB/0xA9 -> 0x00, CTR read/write 0x20/0x60, port enable/disable 0xA7/0xA8/0xAD/0xAE, loop-back 0xD2/0xD3,
    output port 0xD0/0xD1). Status reads report an empty output buffer unless a reply is waiting, so the driver's
    flush loop ends at once. Bytes for the (absent) keyboard or mouse are dropped. ``on_reset`` is called for the
    reset pulse 0xFE (any 0xF0-0xFF with bit 0 clear) and for an output-port write clearing bit 0 (reboot=k).
    Offsets 1-3 (ports 0x61-0x63) are not the controller's: reads return 0xFF, writes are ignored.

    :param on_reset: called on the vCPU thread when the guest pulses the CPU reset line.
    """

    def __init__(self, on_reset: Callable[[], None]):
        self.on_reset = on_reset
        self.ram = bytearray(32)
        self.ram[0] = CTR_SYS | CTR_XLATE
        self.output = 0  # output buffer (the last byte stays readable after it was read)
        self.obf = False
        self.aux = False  # output buffer byte came from the mouse side
        self.pending = 0  # command waiting for its data byte, or 0
        self.cmddat = True
        self.output_port = OUTPUT_PORT_RESET | OUTPUT_PORT_A20

    @property
    def ctr(self) -> int:
        """The controller command byte (CTR)."""
        return self.ram[0]

    def read(self, offset: int, size: int) -> bytes:
        """Read the data port (offset 0: takes the waiting byte) or the status register (offset 4)."""
        out = bytearray()
        for off in range(offset, offset + size):
            if off == DATA:
                out.append(self.output)
                self.obf = self.aux = False
            elif off == STATUS:
                out.append((STR_OBF if self.obf else 0) | (STR_AUXDATA if self.obf and self.aux else 0)
                           | (self.ram[0] & CTR_SYS) | (STR_CMDDAT if self.cmddat else 0) | STR_KEYLOCK)
            else:
                out.append(0xFF)
        return bytes(out)

    def write(self, offset: int, data: bytes) -> None:
        """Write the data port (offset 0) or the command port (offset 4)."""
        for i, value in enumerate(data):
            if offset + i == DATA:
                self.cmddat = False
                self._data(value)
            elif offset + i == COMMAND:
                self.cmddat = True
                self._command(value)

    def _reply(self, value: int, aux: bool = False) -> None:
        self.output, self.obf, self.aux = value, True, aux

    def _command(self, cmd: int) -> None:
        self.pending = 0
        if 0x20 <= cmd <= 0x3F:
            self._reply(self.ram[cmd & 0x1F])
        elif 0x60 <= cmd <= 0x7F or cmd in (CMD_WRITE_OUTPUT_PORT, CMD_KBD_LOOP, CMD_AUX_LOOP, CMD_AUX_SEND):
            self.pending = cmd
        elif cmd == CMD_AUX_DISABLE:
            self.ram[0] |= CTR_AUXDIS
        elif cmd == CMD_AUX_ENABLE:
            self.ram[0] &= ~CTR_AUXDIS
        elif cmd in (CMD_AUX_TEST, CMD_KBD_TEST):
            self._reply(0x00)
        elif cmd == CMD_CTL_TEST:
            self.ram[0] |= CTR_SYS
            self._reply(CTL_TEST_OK)
        elif cmd == CMD_KBD_DISABLE:
            self.ram[0] |= CTR_KBDDIS
        elif cmd == CMD_KBD_ENABLE:
            self.ram[0] &= ~CTR_KBDDIS
        elif cmd == CMD_READ_OUTPUT_PORT:
            self._reply(self.output_port)
        elif cmd >= 0xF0 and not cmd & OUTPUT_PORT_RESET:
            self.on_reset()
        # Anything else (password, mux and vendor commands) is ignored.

    def _data(self, value: int) -> None:
        cmd, self.pending = self.pending, 0
        if 0x60 <= cmd <= 0x7F:
            self.ram[cmd & 0x1F] = value
        elif cmd == CMD_WRITE_OUTPUT_PORT:
            self.output_port = value
            if not value & OUTPUT_PORT_RESET:
                self.on_reset()
        elif cmd == CMD_KBD_LOOP:
            self._reply(value)
        elif cmd == CMD_AUX_LOOP:
            self._reply(value, aux=True)
        # CMD_AUX_SEND and bare data bytes go to a mouse or keyboard that is not there.

    def state(self) -> dict:
        """The controller's registers as a plain dict (``ram`` as bytes)."""
        return {"ram": bytes(self.ram), "output": self.output, "obf": self.obf, "aux": self.aux,
                "pending": self.pending, "cmddat": self.cmddat, "output_port": self.output_port}

    def restore(self, d: dict) -> None:
        """Load a dict from ``state()``. :raises ValueError: if a key is missing or ``ram`` is not 32 bytes."""
        missing = [k for k in ("ram", "output", "obf", "aux", "pending", "cmddat", "output_port") if k not in d]
        if missing:
            raise ValueError(f"i8042 state lacks {', '.join(missing)}")
        if len(d["ram"]) != 32:
            raise ValueError(f"i8042 state has {len(d['ram'])} bytes of RAM, not 32")
        self.ram = bytearray(d["ram"])
        self.output, self.obf, self.aux = d["output"], bool(d["obf"]), bool(d["aux"])
        self.pending, self.cmddat, self.output_port = d["pending"], bool(d["cmddat"]), d["output_port"]
