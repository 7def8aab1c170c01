"""16550A UART: line status, interrupt identification and levels, divisor latch, FIFOs, loopback, input, snapshots."""

from hypothesis import given, settings
from hypothesis import strategies as st

from popek.devices.serial import (DLL, DLM, FCR, IER, IER_EDSSI, IER_ELSI, IER_ERBFI, IER_ETBEI, IIR, IIR_CTI,
                                  IIR_MSI, IIR_NO_INT, IIR_RDI, IIR_RLSI, IIR_THRI, LCR, LCR_DLAB, LSR, LSR_DR,
                                  LSR_OE, LSR_TEMT, LSR_THRE, MCR, MCR_DTR, MCR_LOOP, MCR_OUT1, MCR_OUT2, MCR_RTS,
                                  MSR, MSR_CTS, MSR_DCD, MSR_DSR, RBR, SCR, THR, Serial)
from popek.irq import RecordingIrqLine


def make(**kw):
    irq, out = RecordingIrqLine(4), []
    return Serial(irq, out.append, **kw), irq, out


def rd(s, reg):
    return s.read(reg, 1)[0]


def wr(s, reg, value):
    s.write(reg, bytes([value]))


def test_lsr_reports_transmitter_empty_and_data_ready_only_with_received_data():
    s, _, _ = make()
    assert rd(s, LSR) == LSR_THRE | LSR_TEMT
    s.enqueue_input(b"a")
    assert rd(s, LSR) == LSR_THRE | LSR_TEMT | LSR_DR
    assert rd(s, RBR) == ord("a")
    assert rd(s, LSR) & LSR_DR == 0


def test_thr_write_goes_to_output_unbuffered_byte_by_byte():
    s, _, out = make()
    wr(s, THR, ord("h"))
    assert out == [b"h"]
    s.write(THR, b"i")
    assert out == [b"h", b"i"]
    assert rd(s, LSR) & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT


def test_dlab_switches_offsets_0_and_1_to_the_divisor_latch():
    s, _, out = make()
    wr(s, IER, IER_ERBFI)
    wr(s, LCR, LCR_DLAB | 0x03)
    wr(s, DLL, 0x01)
    wr(s, DLM, 0x02)
    assert (rd(s, DLL), rd(s, DLM)) == (0x01, 0x02)
    assert out == []  # the DLL write did not transmit
    wr(s, LCR, 0x03)
    assert rd(s, IER) == IER_ERBFI
    assert rd(s, LCR) == 0x03
    wr(s, LCR, LCR_DLAB)
    assert (rd(s, DLL), rd(s, DLM)) == (0x01, 0x02)


def test_ier_keeps_only_the_four_16550_enable_bits():
    s, _, _ = make()
    wr(s, IER, 0xFF)
    assert rd(s, IER) == 0x0F


def test_thre_interrupt_on_enabling_etbei_cleared_by_iir_read_and_reasserted_on_reenable():
    s, irq, _ = make()
    wr(s, MCR, MCR_OUT2)
    wr(s, IER, IER_ETBEI)
    assert irq.level
    assert rd(s, IIR) == IIR_THRI
    assert not irq.level
    assert rd(s, IIR) == IIR_NO_INT
    wr(s, IER, IER_ETBEI)  # unchanged: no new interrupt
    assert rd(s, IIR) == IIR_NO_INT
    wr(s, IER, 0)
    wr(s, IER, IER_ETBEI)  # Linux's UART_BUG_THRE probe expects this to reassert
    assert irq.level and rd(s, IIR) == IIR_THRI
    assert irq.events == [1, 0, 1, 0]


def test_thr_write_clears_then_reasserts_thre_interrupt_giving_a_fresh_edge():
    s, irq, out = make()
    wr(s, MCR, MCR_OUT2)
    wr(s, IER, IER_ETBEI)
    wr(s, THR, ord("x"))
    assert out == [b"x"]
    assert irq.events == [1, 0, 1]
    wr(s, IER, 0)
    assert not irq.level
    wr(s, THR, ord("y"))  # ETBEI off: no interrupt at all
    assert irq.events == [1, 0, 1, 0]


def test_iir_priority_line_status_then_data_then_thre_then_modem_status():
    s, _, _ = make()
    wr(s, FCR, 0x01)  # FIFO on, trigger level 1
    wr(s, MCR, MCR_LOOP)
    for b in range(17):  # one more than the FIFO holds: overrun
        wr(s, THR, b)
    wr(s, MCR, MCR_LOOP | MCR_DTR)  # DSR changes: modem status delta
    wr(s, IER, IER_ERBFI | IER_ETBEI | IER_ELSI | IER_EDSSI)
    fifo = 0xC0
    assert rd(s, IIR) == fifo | IIR_RLSI
    assert rd(s, IIR) == fifo | IIR_RLSI  # reading IIR does not clear line status
    assert rd(s, LSR) & LSR_OE
    assert rd(s, IIR) == fifo | IIR_RDI
    assert [rd(s, RBR) for _ in range(16)] == list(range(16))
    assert rd(s, IIR) == fifo | IIR_THRI
    assert rd(s, IIR) == fifo | IIR_MSI  # the IIR read cleared THRE, the next source shows
    assert rd(s, MSR) & 0x0F
    assert rd(s, IIR) == fifo | IIR_NO_INT


def test_iir_read_clears_thre_only_when_it_is_the_reported_source():
    s, _, _ = make()
    wr(s, IER, IER_ERBFI | IER_ETBEI)
    s.enqueue_input(b"k")
    assert rd(s, IIR) == IIR_RDI
    assert rd(s, IIR) == IIR_RDI
    rd(s, RBR)
    assert rd(s, IIR) == IIR_THRI
    assert rd(s, IIR) == IIR_NO_INT


def test_fifo_data_below_trigger_level_reports_character_timeout_and_at_trigger_data_available():
    s, _, _ = make()
    wr(s, FCR, 0x41)  # FIFO on, trigger level 4
    wr(s, IER, IER_ERBFI)
    s.enqueue_input(b"abc")
    assert rd(s, IIR) == 0xC0 | IIR_CTI
    s.enqueue_input(b"d")
    assert rd(s, IIR) == 0xC0 | IIR_RDI


def test_fcr_receiver_reset_empties_fifo_and_fifo_enable_shows_in_iir():
    s, _, _ = make()
    assert rd(s, IIR) & 0xC0 == 0
    wr(s, FCR, 0x01)
    assert rd(s, IIR) & 0xC0 == 0xC0
    wr(s, MCR, MCR_LOOP)
    s.write(THR, b"q")
    wr(s, THR, ord("r"))
    assert rd(s, LSR) & LSR_DR
    wr(s, FCR, 0x01 | 0x02)
    assert rd(s, LSR) & LSR_DR == 0
    assert rd(s, FCR) & 0xC0 == 0xC0  # offset 2 reads IIR; the reset bits do not stick
    wr(s, FCR, 0)
    assert rd(s, IIR) & 0xC0 == 0


def test_without_fifo_the_receiver_holds_one_byte_and_host_input_waits_in_the_buffer():
    s, _, _ = make()
    s.enqueue_input(b"xyz")
    assert s.state()["rx_fifo"] == b"x"
    assert bytes(rd(s, RBR) for _ in range(3)) == b"xyz"
    assert rd(s, LSR) & LSR_DR == 0
    assert rd(s, RBR) == ord("z")  # RBR keeps the last byte


def test_fifo_holds_16_bytes_and_more_host_input_follows_as_the_guest_reads():
    s, _, _ = make()
    wr(s, FCR, 0x01)
    data = bytes(range(40))
    assert s.enqueue_input(data) == 40
    assert len(s.state()["rx_fifo"]) == 16
    got = bytearray()
    while rd(s, LSR) & LSR_DR:
        got.append(rd(s, RBR))
    assert bytes(got) == data
    assert rd(s, LSR) & LSR_OE == 0


def test_input_beyond_the_buffer_limit_is_dropped_and_counted():
    s, _, _ = make(input_limit=4)
    assert s.enqueue_input(b"123456") == 4
    assert s.dropped == 2
    assert bytes(rd(s, RBR) for _ in range(4)) == b"1234"


def test_loopback_sends_thr_to_receiver_not_output_and_maps_modem_lines():
    s, _, out = make()
    wr(s, MCR, MCR_LOOP | 0x0A)  # Linux's 8250 loopback probe: LOOP | RTS | OUT2
    assert rd(s, MSR) & 0xF0 == MSR_CTS | MSR_DCD  # 0x90, as the probe requires
    wr(s, MCR, MCR_LOOP | MCR_DTR | MCR_OUT1)
    assert rd(s, MSR) & 0xF0 == MSR_DSR | 0x40
    wr(s, THR, ord("L"))
    assert out == []
    assert rd(s, RBR) == ord("L")


def test_loopback_disconnects_host_input_until_it_is_left():
    s, _, _ = make()
    wr(s, MCR, MCR_LOOP)
    s.enqueue_input(b"h")
    assert rd(s, LSR) & LSR_DR == 0
    wr(s, MCR, 0)
    assert rd(s, LSR) & LSR_DR
    assert rd(s, RBR) == ord("h")


def test_modem_status_outside_loopback_has_cts_dsr_dcd_and_deltas_clear_on_read():
    s, _, _ = make()
    assert rd(s, MSR) == MSR_CTS | MSR_DSR | MSR_DCD
    wr(s, MCR, MCR_LOOP)
    wr(s, MCR, 0)
    assert rd(s, MSR) & 0x0F
    assert rd(s, MSR) & 0x0F == 0


def test_out2_gates_the_interrupt_line_and_loopback_keeps_it_low():
    s, irq, _ = make()
    wr(s, IER, IER_ERBFI)
    s.enqueue_input(b"a")
    assert rd(s, IIR) == IIR_RDI and not irq.level
    wr(s, MCR, MCR_OUT2)
    assert irq.level
    wr(s, MCR, MCR_OUT2 | MCR_LOOP)
    assert not irq.level
    wr(s, MCR, MCR_OUT2)
    rd(s, RBR)
    assert not irq.level
    assert irq.events == [1, 0, 1, 0]


def test_receive_interrupt_raised_from_input_and_lowered_when_drained():
    s, irq, _ = make()
    wr(s, MCR, MCR_OUT2 | MCR_RTS | MCR_DTR)
    wr(s, IER, IER_ERBFI | IER_ELSI)
    s.enqueue_input(b"ok")
    assert irq.events == [1]
    rd(s, RBR)
    assert irq.level
    rd(s, RBR)
    assert irq.events == [1, 0]


def test_scratch_register_stores_a_byte():
    s, _, _ = make()
    wr(s, SCR, 0x5A)
    assert rd(s, SCR) == 0x5A


def test_access_outside_the_eight_registers_raises():
    s, _, _ = make()
    for bad in (lambda: s.read(8, 1), lambda: s.write(7, b"ab")):
        try:
            bad()
        except ValueError as e:
            assert "outside" in str(e)
        else:
            raise AssertionError("no error")


def test_state_round_trip_restores_registers_fifo_input_and_irq_level():
    s, _, _ = make()
    wr(s, FCR, 0x81)
    wr(s, LCR, LCR_DLAB)
    wr(s, DLL, 3)
    wr(s, LCR, 0x03)
    wr(s, SCR, 0x77)
    wr(s, MCR, MCR_OUT2)
    wr(s, IER, IER_ERBFI)
    s.enqueue_input(bytes(range(30)))
    st_ = s.state()
    t, irq2, _ = make()
    t.restore(st_)
    assert t.state() == st_
    assert irq2.level
    assert bytes(rd(t, RBR) for _ in range(30)) == bytes(range(30))


def test_restore_rejects_incomplete_state():
    s, _, _ = make()
    d = s.state()
    del d["dll"]
    try:
        s.restore(d)
    except ValueError as e:
        assert "dll" in str(e)
    else:
        raise AssertionError("no error")


ops = st.lists(st.one_of(
    st.tuples(st.just("w"), st.integers(0, 7), st.integers(0, 255)),
    st.tuples(st.just("r"), st.integers(0, 7), st.just(0)),
    st.tuples(st.just("in"), st.integers(0, 40), st.just(0)),
), max_size=60)


def run_ops(s, seq):
    for kind, reg, value in seq:
        if kind == "w":
            wr(s, reg, value)
        elif kind == "r":
            rd(s, reg)
        else:
            s.enqueue_input(bytes(range(reg)))


@settings(max_examples=300, deadline=None)
@given(ops)
def test_random_register_traffic_keeps_iir_and_irq_level_and_lsr_consistent(seq):
    s, irq, _ = make(input_limit=100)
    for kind, reg, value in seq:
        run_ops(s, [(kind, reg, value)])
        d = s.state()
        level = irq.level
        iir = rd(s, IIR)  # may clear THRE; checked against the level from before the read
        lsr = rd(s, LSR)
        gated = (d["mcr"] & (MCR_OUT2 | MCR_LOOP)) == MCR_OUT2
        assert level == (iir & 1 == 0 and gated)
        assert (iir & 0xC0 == 0xC0) == bool(d["fcr"] & 1)
        assert lsr & (LSR_THRE | LSR_TEMT) == LSR_THRE | LSR_TEMT
        assert bool(lsr & LSR_DR) == bool(d["rx_fifo"])
        assert len(d["rx_fifo"]) <= (16 if d["fcr"] & 1 else 1)
        assert len(d["input"]) <= 100


@settings(max_examples=150, deadline=None)
@given(ops, ops)
def test_restored_uart_behaves_like_the_original(before, after):
    a, irq_a, out_a = make()
    run_ops(a, before)
    b, irq_b, out_b = make()
    b.restore(a.state())
    assert irq_b.level == irq_a.level
    del out_a[:]
    run_ops(a, after)
    run_ops(b, after)
    assert a.state() == b.state()
    assert out_a == out_b
    assert irq_a.level == irq_b.level


def test_linux_8250_probe_sees_a_16550a_with_a_working_thre_interrupt():
    """The register checks of Linux's drivers/tty/serial/8250/8250_port.c autoconfig() and serial8250_do_startup()."""
    s, _, _ = make()
    wr(s, IER, 0)
    scratch2 = rd(s, IER) & 0x0F
    wr(s, IER, 0x0F)
    scratch3 = rd(s, IER) & 0x0F
    wr(s, IER, 0)
    assert (scratch2, scratch3) == (0, 0x0F)
    wr(s, MCR, MCR_LOOP | 0x0A)
    assert rd(s, MSR) & 0xF0 == 0x90
    wr(s, MCR, 0)
    wr(s, LCR, 0xBF)
    wr(s, 2, 0)  # EFR on a 16650; FCR here
    wr(s, LCR, 0)
    wr(s, FCR, 0x01)
    assert rd(s, IIR) >> 6 == 3  # autoconfig_16550a
    for lcr in (0x80, 0xBF):  # no EFR: reads of offset 2 give IIR, never 0
        wr(s, LCR, lcr)
        assert rd(s, 2) != 0
    wr(s, LCR, 0)
    wr(s, FCR, 0x01 | 0x20)  # 64-byte FIFO bit of a 16750: not there
    assert rd(s, IIR) & 0xE0 == 0xC0
    wr(s, IER, 0x40)  # XScale UUE bit: not there
    assert rd(s, IER) & 0x40 == 0
    wr(s, IER, IER_ETBEI)  # startup: UART_BUG_THRE test
    iir1 = rd(s, IIR)
    wr(s, IER, 0)
    wr(s, IER, IER_ETBEI)
    iir = rd(s, IIR)
    wr(s, IER, 0)
    assert not (not iir1 & IIR_NO_INT and iir & IIR_NO_INT)
    assert iir & 0x0F == IIR_THRI
    assert rd(s, LSR) != 0xFF
