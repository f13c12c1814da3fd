// swift-tools-version:6.0
// MiniCPMVCore: the platform-neutral host half of the iOS app (Foundation only), built and tested
// on Linux by `make test`. The SwiftUI app and its Core ML engine (Sources/MiniCPMVApp) are built by
// Xcode from project.yml, which uses this package's library.
import PackageDescription

let package = Package(
    name: "MiniCPMV",
    platforms: [.iOS(.v18), .macOS(.v15)],
    products: [
        .library(name: "MiniCPMVCore", targets: ["MiniCPMVCore"])
    ],
    targets: [
        .target(name: "MiniCPMVCore", path: "Sources/MiniCPMVCore"),
        .testTarget(name: "MiniCPMVCoreTests", dependencies: ["MiniCPMVCore"], path: "Tests/MiniCPMVCoreTests"),
    ]
)
