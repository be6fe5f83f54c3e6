//go:build amd64 || arm64

package compat

import (
	"fmt"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// kernelSigaction is struct sigaction as rt_sigaction(2) takes it on amd64
// and arm64.
type kernelSigaction struct {
	handler  uintptr
	flags    uint64
	restorer uintptr
	mask     uint64
}

const saRestart = 0x10000000 // SA_RESTART

func rtSigaction(sig syscall.Signal, act, old *kernelSigaction) error {
	_, _, e := unix.RawSyscall6(unix.SYS_RT_SIGACTION, uintptr(sig),
		uintptr(unsafe.Pointer(act)), uintptr(unsafe.Pointer(old)), 8, 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

// setupSignals makes SIGALRM and SIGUSR1 interrupt system calls the way a C
// program's handlers would: the Go runtime handles both (signal.Notify; the
// values are dropped), with SA_RESTART as Go installs it for SIGALRM, and
// the same handler without SA_RESTART for SIGUSR1. Only threads that
// startSignals targets with tgkill receive them.
func setupSignals() error {
	signal.Notify(make(chan os.Signal, 1), syscall.SIGALRM, syscall.SIGUSR1)
	var sa kernelSigaction
	if err := rtSigaction(syscall.SIGUSR1, nil, &sa); err != nil {
		return fmt.Errorf("rt_sigaction(SIGUSR1): %w", err)
	}
	sa.flags &^= saRestart
	if err := rtSigaction(syscall.SIGUSR1, &sa, nil); err != nil {
		return fmt.Errorf("rt_sigaction(SIGUSR1): %w", err)
	}
	var alrm, usr1 kernelSigaction
	if err := rtSigaction(syscall.SIGALRM, nil, &alrm); err != nil {
		return err
	}
	if err := rtSigaction(syscall.SIGUSR1, nil, &usr1); err != nil {
		return err
	}
	if alrm.handler <= 1 || alrm.flags&saRestart == 0 || usr1.handler <= 1 || usr1.flags&saRestart != 0 {
		return fmt.Errorf("signal handlers not as intended: SIGALRM %+v, SIGUSR1 %+v", alrm, usr1)
	}
	return nil
}

// signaler interrupts one OS thread with a signal every SignalInterval.
type signaler struct {
	stop chan struct{}
	done chan struct{}
	sent atomic.Int64
}

// startSignals targets the calling thread, which must be locked
// (runtime.LockOSThread) until stop returns. mode is SigRestart or
// SigNoRestart; "" returns nil.
func startSignals(mode string) *signaler {
	var sig syscall.Signal
	switch mode {
	case SigRestart:
		sig = syscall.SIGALRM
	case SigNoRestart:
		sig = syscall.SIGUSR1
	default:
		return nil
	}
	s := &signaler{stop: make(chan struct{}), done: make(chan struct{})}
	pid, tid := unix.Getpid(), unix.Gettid()
	go func() {
		defer close(s.done)
		t := time.NewTicker(SignalInterval)
		defer t.Stop()
		for {
			select {
			case <-s.stop:
				return
			case <-t.C:
				if unix.Tgkill(pid, tid, sig) == nil {
					s.sent.Add(1)
				}
			}
		}
	}()
	return s
}

// halt stops the signals and returns how many were sent (nil-safe).
func (s *signaler) halt() int64 {
	if s == nil {
		return 0
	}
	select {
	case <-s.stop:
	default:
		close(s.stop)
	}
	<-s.done
	return s.sent.Load()
}
